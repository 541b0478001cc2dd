#include "server/generation_service.h"

#include <deque>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/prompt_rules.h"
#include "core/status_macros.h"
#include "server/adapter_residency.h"
#include "server/generate_request.h"
#include "spdlog/spdlog.h"

namespace adapterd::server {
namespace {

namespace v1 = adapterd::v1;

v1::FinishReason ToProto(core::FinishReason r) {
  switch (r) {
    case core::FinishReason::kLength: return v1::FINISH_REASON_LENGTH;
    case core::FinishReason::kEos: return v1::FINISH_REASON_EOS;
    case core::FinishReason::kStop: return v1::FINISH_REASON_STOP;
    case core::FinishReason::kCancelled: return v1::FINISH_REASON_CANCELLED;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

void FillToken(const core::StepOutput& s, v1::GeneratedToken* t) {
  t->set_id(s.token);
  t->set_logprob(s.logprob);
  for (const core::TokenLogprob& alt : s.top) {
    auto* a = t->add_top_logprobs();
    a->set_id(alt.id);
    a->set_logprob(alt.logprob);
  }
}

void FillStats(const GenerationStats& s, v1::GenerationStats* out) {
  out->set_prompt_tokens(static_cast<uint32_t>(s.prompt_tokens));
  out->set_completion_tokens(static_cast<uint32_t>(s.completion_tokens));
  out->set_cached_prompt_tokens(static_cast<uint32_t>(s.cached_prompt_tokens));
  out->set_queue_seconds(s.queue_seconds);
  out->set_time_to_first_token_seconds(s.time_to_first_token_seconds);
  out->set_total_seconds(s.total_seconds);
  out->set_adapter_load_wait_seconds(s.adapter_load_wait_seconds);
}

// Unary Generate: the sink accumulates the response; OnDone finishes the call.
class UnaryCall final : public grpc::ServerUnaryReactor {
 public:
  explicit UnaryCall(std::shared_ptr<std::atomic<bool>> cancelled) : cancelled_(std::move(cancelled)) {}
  void OnCancel() override { cancelled_->store(true); }
  void OnDone() override { delete this; }

 private:
  std::shared_ptr<std::atomic<bool>> cancelled_;
};

class UnarySink final : public RequestSink {
 public:
  UnarySink(UnaryCall* call, v1::GenerateResponse* response) : call_(call), response_(response) {}
  void OnTokens(const std::vector<core::StepOutput>& tokens, const std::string& text) override {
    for (const core::StepOutput& s : tokens) {
      response_->add_token_ids(s.token);
      FillToken(s, response_->add_tokens());
    }
    response_->mutable_text()->append(text);
  }
  void OnDone(const absl::Status& status, core::FinishReason reason, const GenerationStats& stats,
              const std::string& text) override {
    response_->mutable_text()->append(text);
    response_->set_finish_reason(ToProto(reason));
    FillStats(stats, response_->mutable_stats());
    UnaryCall* call = call_;
    call_ = nullptr;  // The call may be gone once finished.
    call->Finish(ToGrpc(status));
  }

 private:
  UnaryCall* call_;
  v1::GenerateResponse* response_;
};

// Streaming: chunks queue up while a write is in flight and are merged, so a slow client
// never slows the scheduler down. StartWrite and Finish are called with no lock held: gRPC may
// run OnWriteDone or OnDone (which deletes the call) inline, and nothing may touch the call
// after Finish.
class StreamCall final : public grpc::ServerWriteReactor<v1::GenerateStreamResponse> {
 public:
  StreamCall(std::shared_ptr<std::atomic<bool>> cancelled, std::string adapter)
      : cancelled_(std::move(cancelled)), adapter_(std::move(adapter)) {}

  void Push(const std::vector<core::StepOutput>& tokens, const std::string& text) {
    Next next;
    {
      absl::MutexLock lock(&mu_);
      if (pending_.size() < 2) {  // The front one may be in flight: never touch it.
        pending_.emplace_back();
        pending_.back().set_adapter(adapter_);
      }
      v1::GenerateStreamResponse& chunk = pending_.back();
      for (const core::StepOutput& s : tokens) {
        chunk.add_token_ids(s.token);
        FillToken(s, chunk.add_tokens());
      }
      chunk.mutable_text()->append(text);
      next = Decide();
    }
    Act(next);
  }

  void Done(const absl::Status& status, core::FinishReason reason, const GenerationStats& stats,
            const std::string& text) {
    Next next;
    {
      absl::MutexLock lock(&mu_);
      status_ = ToGrpc(status);
      done_ = true;
      if (status.ok()) {
        if (pending_.size() < 2) {
          pending_.emplace_back();
          pending_.back().set_adapter(adapter_);
        }
        v1::GenerateStreamResponse& last = pending_.back();
        last.mutable_text()->append(text);
        last.set_finish_reason(ToProto(reason));
        FillStats(stats, last.mutable_stats());
      } else if (!writing_) {
        pending_.clear();  // An error ends the stream now.
      }
      next = Decide();
    }
    Act(next);
  }

  void OnWriteDone(bool ok) override {
    Next next;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      pending_.pop_front();
      if (!ok) {
        broken_ = true;
        cancelled_->store(true);
        pending_.clear();
      }
      next = Decide();
    }
    Act(next);
  }
  void OnCancel() override { cancelled_->store(true); }
  void OnDone() override { delete this; }

 private:
  // The next write to start, or the status to finish with, or neither.
  struct Next {
    const v1::GenerateStreamResponse* write = nullptr;
    bool finish = false;
    grpc::Status status;
  };

  // Decides the next write or the finish, whichever is due, and takes it (writing_ or
  // finished_) in the same locked section as the change that made it due. Deciding after
  // releasing the lock let two threads race: the scheduler's Done() unlocked, gRPC's
  // OnWriteDone() meanwhile finished the call (OnDone deleted it), and Done() then read the
  // freed call (found by AddressSanitizer in an e2e test).
  Next Decide() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Next next;
    if (writing_ || finished_) return next;
    if (!pending_.empty() && !broken_ && (status_.ok() || !done_)) {
      writing_ = true;
      next.write = &pending_.front();  // Stays put: nothing touches the front while writing_.
    } else if (done_ && (pending_.empty() || broken_ || !status_.ok())) {
      finished_ = true;
      next.finish = true;
      next.status = broken_ && status_.ok()
                        ? grpc::Status(grpc::StatusCode::CANCELLED, "client went away")
                        : status_;
    }
    return next;
  }

  // Carries out what Decide() took, with no lock held. Must be the last thing its caller does
  // with the call: once the write completes or the call finishes, another thread may delete it.
  void Act(const Next& next) {
    if (next.write != nullptr) {
      StartWrite(next.write);
    } else if (next.finish) {
      Finish(next.status);
    }
  }

  absl::Mutex mu_;
  std::deque<v1::GenerateStreamResponse> pending_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<std::atomic<bool>> cancelled_;
  std::string adapter_;
};

class StreamSink final : public RequestSink {
 public:
  explicit StreamSink(StreamCall* call) : call_(call) {}
  void OnTokens(const std::vector<core::StepOutput>& tokens, const std::string& text) override {
    call_->Push(tokens, text);
  }
  void OnDone(const absl::Status& status, core::FinishReason reason, const GenerationStats& stats,
              const std::string& text) override {
    StreamCall* call = call_;
    call_ = nullptr;
    call->Done(status, reason, stats, text);
  }

 private:
  StreamCall* call_;
};

}  // namespace

// Resolves the parts of `r`'s weighted mix: with every part resident, `r->adapter` is the
// mix; with some loading on demand, `r->adapter_wait` settles once all have, with the mix or
// the first failed load's error.
static absl::Status ResolveMix(ServingContext& ctx, GenerationRequest* r) {
  r->adapter_name = adapters::MixName(r->mix);
  std::vector<adapters::AdapterRef> refs;  // Null for a part still loading.
  std::vector<std::shared_ptr<AdapterWait>> waits;
  bool loading = false;
  for (const auto& [name, weight] : r->mix) {
    auto resolved = ctx.residency->Resolve(name);
    if (!resolved.ok()) return resolved.status();
    loading = loading || resolved->wait != nullptr;
    refs.push_back(std::move(resolved->adapter));
    waits.push_back(std::move(resolved->wait));
  }
  const core::Engine* engine = ctx.engine.get();
  adapters::MixCache* cache = ctx.mixes.get();
  const std::string name = r->adapter_name;
  auto combine = [engine, cache, name, mix = r->mix](const std::vector<adapters::AdapterRef>& refs)
      -> absl::StatusOr<adapters::AdapterRef> {
    std::vector<adapters::MixPart> parts;
    for (size_t i = 0; i < refs.size(); ++i) parts.push_back({refs[i], mix[i].second});
    return cache != nullptr ? cache->Get(*engine, parts, name) : adapters::MixAdapters(*engine, parts, name);
  };
  if (loading) {  // Resident parts join the wait as settled ones.
    for (size_t i = 0; i < waits.size(); ++i) {
      if (waits[i] == nullptr) waits[i] = AdapterWait::Settled(r->mix[i].first, refs[i]);
    }
    r->adapter_wait = AdapterWait::AllOf(name, std::move(waits), std::move(combine));
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(r->adapter, combine(refs));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<GenerationRequest>> BuildRequest(
    ServingContext& ctx, const v1::GenerateRequest& request,
    std::chrono::system_clock::time_point deadline, adapters::AdapterRef resolved) {
  if (!ctx.ready.load()) return absl::UnavailableError("the model is still loading");
  auto r = std::make_unique<GenerationRequest>();
  r->id = ctx.next_request_id.fetch_add(1);
  const core::Engine& engine = *ctx.engine;
  RequestRules rules = ctx.limits;
  // A named adapter may resize the vocabulary: its ids are checked once it is resolved
  // (FitPromptToAdapter).
  rules.vocab_size = request.adapter().empty() ? engine.config().vocab_size : int64_t{INT32_MAX} + 1;
  rules.context_length = engine.context_length();
  if (absl::Status s = ParseGenerateRequest(request, rules, ctx.tokenizer.get(), r.get());
      !s.ok()) {
    return s;
  }
  if (!r->mix.empty()) {
    if (absl::Status s = ResolveMix(ctx, r.get()); !s.ok()) return s;
  } else if (!request.adapter().empty()) {
    r->adapter_name = request.adapter();
    if (resolved != nullptr) {
      r->adapter = std::move(resolved);
    } else {
      auto found = ctx.residency->Resolve(request.adapter());
      if (!found.ok()) return found.status();
      r->adapter = std::move(found->adapter);
      r->adapter_wait = std::move(found->wait);  // The scheduler checks the prompt once loaded.
    }
    if (absl::Status s = FitPromptToAdapter(*r, r->adapter, engine); !s.ok()) return s;
  }
  if (deadline != std::chrono::system_clock::time_point::max()) {
    r->deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                     deadline - std::chrono::system_clock::now());
  }
  return r;
}

void GenerationService::CountRefusal(const std::string& adapter, const absl::Status& status) {
  // Metrics bounds the adapter label: names that are not loaded share one series.
  ctx_.metrics.RequestDone(adapter, absl::StatusCodeToString(status.code()), 0, 0, 0, 0, 0);
}

grpc::ServerUnaryReactor* GenerationService::Generate(grpc::CallbackServerContext* context,
                                                      const v1::GenerateRequest* request,
                                                      v1::GenerateResponse* response) {
  auto built = BuildRequest(ctx_, *request, context->deadline());
  if (!built.ok()) {
    auto* reactor = context->DefaultReactor();
    CountRefusal(request->adapter(), built.status());
    reactor->Finish(ToGrpc(built.status()));
    return reactor;
  }
  response->set_adapter((*built)->adapter_name);
  const std::string adapter = (*built)->adapter_name;
  auto* call = new UnaryCall((*built)->cancelled);
  absl::Status submitted =
      ctx_.scheduler->Submit(*std::move(built), std::make_shared<UnarySink>(call, response));
  if (!submitted.ok()) {
    CountRefusal(adapter, submitted);
    call->Finish(ToGrpc(submitted));
  }
  return call;
}

grpc::ServerWriteReactor<v1::GenerateStreamResponse>* GenerationService::GenerateStream(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  auto built = BuildRequest(ctx_, *request, context->deadline());
  if (!built.ok()) {
    CountRefusal(request->adapter(), built.status());
    auto* call = new StreamCall(std::make_shared<std::atomic<bool>>(false), "");
    call->Done(built.status(), core::FinishReason::kCancelled, GenerationStats(), "");
    return call;
  }
  const std::string adapter = (*built)->adapter_name;
  auto* call = new StreamCall((*built)->cancelled, adapter);
  absl::Status submitted =
      ctx_.scheduler->Submit(*std::move(built), std::make_shared<StreamSink>(call));
  if (!submitted.ok()) {
    CountRefusal(adapter, submitted);
    call->Done(submitted, core::FinishReason::kCancelled, GenerationStats(), "");
  }
  return call;
}

grpc::ServerUnaryReactor* GenerationService::Tokenize(grpc::CallbackServerContext* context,
                                                      const v1::TokenizeRequest* request,
                                                      v1::TokenizeResponse* response) {
  auto* reactor = context->DefaultReactor();
  if (!ctx_.ready.load()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading"));
    return reactor;
  }
  if (ctx_.tokenizer == nullptr) {
    reactor->Finish(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                 "the model folder has no tokenizer.json"));
    return reactor;
  }
  adapters::AdapterRef adapter;  // Keeps its tokenizer alive for the call.
  if (!request->adapter().empty()) {
    adapter = ctx_.table->Acquire(request->adapter());
    if (adapter == nullptr) {
      reactor->Finish(grpc::Status(grpc::StatusCode::NOT_FOUND,
                                   absl::StrCat("adapter \"", request->adapter(), "\" is not loaded")));
      return reactor;
    }
  }
  const core::Tokenizer* own = adapters::TokenizerOf(adapter);
  const core::Tokenizer* tokenizer = own != nullptr ? own : ctx_.tokenizer.get();
  auto ids = tokenizer->Encode(request->text(), !request->has_add_special_tokens() ||
                                                   request->add_special_tokens());
  if (!ids.ok()) {
    reactor->Finish(ToGrpc(ids.status()));
    return reactor;
  }
  response->mutable_ids()->Assign(ids->begin(), ids->end());
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace adapterd::server
