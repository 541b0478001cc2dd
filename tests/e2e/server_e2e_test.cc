// End-to-end: the real adapterd binary over real sockets, driven by gRPC clients.
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <thread>

#include "core/tokenizer.h"
#include "gmock/gmock.h"
#include "grpcpp/generic/generic_stub.h"
#include "gtest/gtest.h"
#include "tests/e2e/server_process.h"

namespace adapterd::testing {
namespace {

namespace v1 = adapterd::v1;
using ::testing::HasSubstr;
using ::testing::Not;

const char* const kPreload =
    "--preload=qv=lora_qv,pre=prefix_llama,pt=prompt_llama";

std::string Model() { return Fixture("llama_tok"); }

// Streams `req`; returns the concatenated chunks as one response.
grpc::Status Stream(const ServerProcess& s, const v1::GenerateRequest& req,
                    v1::GenerateResponse* out, std::function<void(int)> after_chunk = nullptr) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  ctx.set_wait_for_ready(true);  // As Generate() (server_process.h).
  auto reader = s.Generation()->GenerateStream(&ctx, req);
  v1::GenerateStreamResponse chunk;
  int n = 0;
  while (reader->Read(&chunk)) {
    out->mutable_text()->append(chunk.text());
    for (int32_t id : chunk.token_ids()) out->add_token_ids(id);
    for (const auto& t : chunk.tokens()) *out->add_tokens() = t;
    if (chunk.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      out->set_finish_reason(chunk.finish_reason());
      *out->mutable_stats() = chunk.stats();
    }
    out->set_adapter(chunk.adapter());
    if (after_chunk) after_chunk(n);
    ++n;
  }
  return reader->Finish();
}

// The server's /metrics text, through curl.
std::string ScrapeMetrics(const ServerProcess& s) {
  const std::string cmd = "curl -s http://127.0.0.1:" + std::to_string(s.metrics_port()) + "/metrics";
  FILE* p = ::popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  ::pclose(p);
  return out;
}

std::vector<int32_t> Ids(const v1::GenerateResponse& r) {
  return {r.token_ids().begin(), r.token_ids().end()};
}

class E2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { server_ = new ServerProcess(Model(), {kPreload}); }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override { ASSERT_TRUE(server_->ok()); }
  // A failed test shows what the server logged (its statuses, its INTERNAL details, a crash).
  void TearDown() override {
    if (HasFailure()) std::cerr << "server log:\n" << server_->log() << "\n";
  }
  static ServerProcess* server_;
};
ServerProcess* E2eTest::server_ = nullptr;

TEST_F(E2eTest, TextPromptEqualsItsTokenIdsAndTextEqualsTheirDecode) {
  grpc::ClientContext tctx;
  v1::TokenizeRequest treq;
  treq.set_text("Hello world, this is adapterd.");
  v1::TokenizeResponse tresp;
  ASSERT_TRUE(server_->Generation()->Tokenize(&tctx, treq, &tresp).ok());
  auto tok = core::Tokenizer::FromModelDir(Model());
  ASSERT_TRUE(tok.ok());
  EXPECT_EQ(std::vector<int32_t>(tresp.ids().begin(), tresp.ids().end()),
            *(*tok)->Encode(treq.text(), true));

  v1::GenerateRequest by_text;
  by_text.set_text(treq.text());
  by_text.set_max_new_tokens(12);
  by_text.set_ignore_eos(true);
  v1::GenerateRequest by_ids =
      IdsRequest({tresp.ids().begin(), tresp.ids().end()}, "", 12);
  v1::GenerateResponse a, b;
  ASSERT_TRUE(Generate(*server_, by_text, &a).ok());
  ASSERT_TRUE(Generate(*server_, by_ids, &b).ok());
  EXPECT_EQ(Ids(a), Ids(b));
  EXPECT_EQ(a.token_ids_size(), 12);
  EXPECT_EQ(a.text(), *(*tok)->Decode(Ids(a), false));
  EXPECT_EQ(a.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(a.stats().prompt_tokens(), static_cast<uint32_t>(tresp.ids_size()));
  EXPECT_EQ(a.stats().completion_tokens(), 12u);
  EXPECT_GT(a.stats().total_seconds(), 0);
}

TEST_F(E2eTest, StreamingEqualsUnaryForEveryAdapterGreedyAndSampled) {
  for (const std::string adapter : {"", "qv", "pre", "pt"}) {
    for (bool sample : {false, true}) {
      v1::GenerateRequest req = IdsRequest({1, 450, 4996, 17354, 1701}, adapter, 16);
      req.set_top_logprobs(2);
      if (sample) {
        req.set_temperature(0.9f);
        req.set_top_k(50);
        req.set_seed(1234);
      }
      v1::GenerateResponse unary, streamed;
      grpc::Status u = Generate(*server_, req, &unary);
      ASSERT_TRUE(u.ok()) << adapter << ": " << u.error_code() << " " << u.error_message();
      grpc::Status st = Stream(*server_, req, &streamed);
      ASSERT_TRUE(st.ok()) << adapter << ": " << st.error_code() << " " << st.error_message();
      EXPECT_EQ(Ids(unary), Ids(streamed)) << adapter << " sample=" << sample;
      EXPECT_EQ(unary.text(), streamed.text()) << adapter;
      EXPECT_EQ(unary.finish_reason(), streamed.finish_reason());
      EXPECT_EQ(streamed.adapter(), adapter);
      ASSERT_EQ(unary.tokens_size(), streamed.tokens_size());
      for (int i = 0; i < unary.tokens_size(); ++i) {
        EXPECT_NEAR(unary.tokens(i).logprob(), streamed.tokens(i).logprob(), 1e-5);
        EXPECT_EQ(streamed.tokens(i).top_logprobs_size(), 2);
      }
    }
  }
}

TEST_F(E2eTest, GreedyOverGrpcEqualsAdapterdGenerate) {
  const std::vector<int32_t> prompt = {1, 306, 1016, 304, 1207, 263};
  const std::map<std::string, std::string> adapters = {
      {"", ""}, {"qv", "lora_qv"}, {"pre", "prefix_llama"}, {"pt", "prompt_llama"}};
  std::string ids;
  for (int32_t id : prompt) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  std::set<std::vector<int32_t>> distinct;
  for (const auto& [name, dir] : adapters) {
    v1::GenerateResponse resp;
    ASSERT_TRUE(Generate(*server_, IdsRequest(prompt, name, 10), &resp).ok()) << name;
    std::string cmd = AdapterdBinary() + " generate --json --ignore_eos --log_level=warn " +
                      "--max_new_tokens 10 --model_dir " + Model() + " --prompt_ids " + ids +
                      (dir.empty() ? "" : " --adapter_dir " + Fixture("adapters/" + dir)) +
                      " 2>/dev/null";
    FILE* p = ::popen(cmd.c_str(), "r");
    std::string out;
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
    ASSERT_EQ(::pclose(p), 0) << cmd;
    auto cli = nlohmann::json::parse(out);
    EXPECT_EQ(cli["tokens"].get<std::vector<int32_t>>(), Ids(resp)) << "adapter " << name;
    distinct.insert(Ids(resp));
  }
  EXPECT_EQ(distinct.size(), adapters.size());  // Every adapter changes the output.
}

TEST_F(E2eTest, ConcurrentMixedAdapterRequestsEqualTheSameRequestsOneAtATime) {
  const std::vector<std::string> adapters = {"", "qv", "pre", "pt"};
  std::vector<v1::GenerateRequest> requests;
  for (int i = 0; i < 32; ++i) {
    std::vector<int32_t> prompt;
    for (int t = 0; t < 3 + i % 7; ++t) prompt.push_back(100 + 37 * i + 11 * t);
    v1::GenerateRequest r = IdsRequest(prompt, adapters[i % adapters.size()], 6 + i % 5);
    if (i % 3 == 0) {
      r.set_temperature(0.8f);
      r.set_seed(i);
    }
    requests.push_back(r);
  }
  std::vector<v1::GenerateResponse> together(requests.size());
  std::vector<grpc::Status> statuses(requests.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < requests.size(); ++i) {
    threads.emplace_back([&, i] { statuses[i] = Generate(*server_, requests[i], &together[i]); });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_TRUE(statuses[i].ok()) << statuses[i].error_message();
    v1::GenerateResponse alone;
    ASSERT_TRUE(Generate(*server_, requests[i], &alone).ok());
    EXPECT_EQ(Ids(together[i]), Ids(alone)) << "request " << i;
  }
}

TEST_F(E2eTest, LoadReplaceUnloadWhileClientsGenerateFailsNothingElse) {
  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, removed_adapter{0}, other_failures{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 16; ++c) {
    clients.emplace_back([&, c] {
      const std::string adapter = c % 3 == 0 ? "churn" : (c % 3 == 1 ? "qv" : "");
      for (int k = 0; k < 200 && !stop.load(); ++k) {
        v1::GenerateResponse resp;
        grpc::Status s = Generate(*server_, IdsRequest({5, 6, 7, static_cast<int32_t>(c)}, adapter, 4), &resp);
        if (s.ok()) {
          ok.fetch_add(1);
        } else if (s.error_code() == grpc::StatusCode::NOT_FOUND && adapter == "churn") {
          removed_adapter.fetch_add(1);
        } else {
          other_failures.fetch_add(1);
          ADD_FAILURE() << "client " << c << ": " << s.error_code() << " " << s.error_message();
        }
      }
    });
  }
  auto admin = server_->Admin();
  const std::vector<std::string> paths = {"lora_regex", "lora_all_rslora", "prefix_llama"};
  // At least 30 admin rounds, and on until the clients have done real work meanwhile.
  for (int i = 0; i < 30 || (ok.load() < 300 && i < 5000); ++i) {
    grpc::ClientContext lctx;
    v1::LoadAdapterRequest load;
    load.set_name("churn");
    load.set_path(paths[i % paths.size()]);
    load.set_replace(true);
    v1::LoadAdapterResponse lresp;
    ASSERT_TRUE(admin->LoadAdapter(&lctx, load, &lresp).ok());
    if (i % 3 == 2) {
      grpc::ClientContext uctx;
      v1::UnloadAdapterRequest unload;
      unload.set_name("churn");
      v1::UnloadAdapterResponse uresp;
      ASSERT_TRUE(admin->UnloadAdapter(&uctx, unload, &uresp).ok());
    }
  }
  stop = true;
  for (auto& t : clients) t.join();
  EXPECT_EQ(other_failures.load(), 0);
  EXPECT_GT(ok.load(), 16);
}

TEST_F(E2eTest, AdapterUnloadedMidStreamFinishesThatStream) {
  auto admin = server_->Admin();
  auto load = [&] {
    grpc::ClientContext ctx;
    v1::LoadAdapterRequest req;
    req.set_name("mid");
    req.set_path("lora_all_rslora");
    v1::LoadAdapterResponse resp;
    return admin->LoadAdapter(&ctx, req, &resp);
  };
  ASSERT_TRUE(load().ok());
  v1::GenerateRequest req = IdsRequest({1, 22, 333, 4444}, "mid", 60);
  v1::GenerateResponse streamed;
  int64_t in_flight = -1;
  grpc::Status s = Stream(*server_, req, &streamed, [&](int chunk) {
    if (chunk != 0) return;
    grpc::ClientContext ctx;
    v1::UnloadAdapterRequest u;
    u.set_name("mid");
    v1::UnloadAdapterResponse ur;
    ASSERT_TRUE(admin->UnloadAdapter(&ctx, u, &ur).ok());
    in_flight = ur.in_flight_references();
  });
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_GE(in_flight, 1);  // The stream still held the adapter when it was removed.
  EXPECT_EQ(streamed.token_ids_size(), 60);
  EXPECT_EQ(streamed.finish_reason(), v1::FINISH_REASON_LENGTH);
  v1::GenerateResponse after;
  EXPECT_EQ(Generate(*server_, req, &after).error_code(), grpc::StatusCode::NOT_FOUND);
  ASSERT_TRUE(load().ok());
  ASSERT_TRUE(Generate(*server_, req, &after).ok());
  EXPECT_EQ(Ids(after), Ids(streamed));  // Same weights all the way through the stream.
  grpc::ClientContext ctx;
  v1::UnloadAdapterRequest u;
  u.set_name("mid");
  v1::UnloadAdapterResponse ur;
  EXPECT_TRUE(admin->UnloadAdapter(&ctx, u, &ur).ok());
}

TEST_F(E2eTest, BadRequestsGetPreciseStatuses) {
  struct Case {
    v1::GenerateRequest req;
    grpc::StatusCode code;
    std::string message;
  };
  std::vector<Case> cases;
  cases.push_back({IdsRequest({1, 2}, "nope", 4), grpc::StatusCode::NOT_FOUND,
                   "adapter \"nope\" is not loaded"});
  auto bad_top_p = IdsRequest({1, 2}, "", 4);
  bad_top_p.set_top_p(1.5f);
  cases.push_back({bad_top_p, grpc::StatusCode::INVALID_ARGUMENT, "top_p must be in (0, 1]"});
  auto bad_temp = IdsRequest({1, 2}, "", 4);
  bad_temp.set_temperature(-0.5f);
  cases.push_back({bad_temp, grpc::StatusCode::INVALID_ARGUMENT, "temperature must be >= 0"});
  auto bad_rep = IdsRequest({1, 2}, "", 4);
  bad_rep.set_repetition_penalty(0);
  cases.push_back({bad_rep, grpc::StatusCode::INVALID_ARGUMENT, "repetition_penalty must be > 0"});
  cases.push_back({IdsRequest(std::vector<int32_t>(300, 5), "", 4),
                   grpc::StatusCode::INVALID_ARGUMENT, "the model's context holds 256"});
  cases.push_back({IdsRequest(std::vector<int32_t>(250, 5), "pt", 4),
                   grpc::StatusCode::INVALID_ARGUMENT, "(+6 virtual)"});
  cases.push_back({IdsRequest({1, 32000}, "", 4), grpc::StatusCode::INVALID_ARGUMENT,
                   "outside the vocabulary"});
  cases.push_back({v1::GenerateRequest(), grpc::StatusCode::INVALID_ARGUMENT, "prompt is missing"});
  cases.push_back({IdsRequest({1, 2}, "", 100000), grpc::StatusCode::INVALID_ARGUMENT,
                   "exceeds the server's limit"});
  for (const Case& c : cases) {
    v1::GenerateResponse resp;
    grpc::Status s = Generate(*server_, c.req, &resp);
    EXPECT_EQ(s.error_code(), c.code) << c.message << ": " << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(c.message));
    v1::GenerateResponse streamed;  // The stream refuses the same way.
    EXPECT_EQ(Stream(*server_, c.req, &streamed).error_code(), c.code) << c.message;
  }
  // A deadline shorter than the work: DEADLINE_EXCEEDED, and the server keeps serving.
  v1::GenerateResponse resp;
  EXPECT_EQ(Generate(*server_, IdsRequest({1, 2, 3}, "", 200), &resp, 5).error_code(),
            grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(Generate(*server_, IdsRequest({1, 2, 3}, "", 2), &resp).ok());
}

TEST_F(E2eTest, AdminListsAdaptersAndReportsModelState) {
  auto admin = server_->Admin();
  grpc::ClientContext lctx;
  v1::ListAdaptersResponse list;
  ASSERT_TRUE(admin->ListAdapters(&lctx, v1::ListAdaptersRequest(), &list).ok());
  std::set<std::string> names;
  for (const auto& a : list.adapters()) names.insert(a.name());
  EXPECT_TRUE(names.count("qv") && names.count("pre") && names.count("pt"));
  grpc::ClientContext sctx;
  v1::ModelState state;
  ASSERT_TRUE(admin->GetModelState(&sctx, v1::GetModelStateRequest(), &state).ok());
  EXPECT_TRUE(state.base().ok());
  ASSERT_EQ(state.base().tied_size(), 1);
  EXPECT_TRUE(state.base().tied(0).same_storage());
  EXPECT_EQ(state.base().architecture(), "LlamaForCausalLM");
  EXPECT_GE(state.adapters_size(), 3);
  EXPECT_GT(state.build().threads(), 0);
  EXPECT_THAT(state.build().cpu_kernels(), ::testing::AnyOf("avx512f", "avx2", "none"));
  // A dry run validates and reports without publishing.
  grpc::ClientContext vctx;
  v1::LoadAdapterRequest dry;
  dry.set_name("dry");
  dry.set_path("lora_all_rslora");
  dry.set_validate_only(true);
  v1::LoadAdapterResponse dresp;
  ASSERT_TRUE(admin->LoadAdapter(&vctx, dry, &dresp).ok());
  EXPECT_FALSE(dresp.loaded());
  EXPECT_EQ(dresp.report().matched_modules_size(), 14);
  v1::GenerateResponse resp;
  EXPECT_EQ(Generate(*server_, IdsRequest({1}, "dry", 1), &resp).error_code(),
            grpc::StatusCode::NOT_FOUND);
  // A refused adapter names its cause and leaves the table as it was.
  grpc::ClientContext bctx;
  v1::LoadAdapterRequest bad;
  bad.set_name("qv");
  bad.set_path("bad_rank");
  bad.set_replace(true);
  grpc::Status s = admin->LoadAdapter(&bctx, bad, &dresp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("lora_B for model.layers.0.self_attn.q_proj"));
  EXPECT_TRUE(Generate(*server_, IdsRequest({1, 2}, "qv", 2), &resp).ok());
}

TEST_F(E2eTest, MetricsCountRequestsByAdapter) {
  v1::GenerateResponse resp;
  ASSERT_TRUE(Generate(*server_, IdsRequest({9, 8, 7}, "qv", 3), &resp).ok());
  const std::string out = ScrapeMetrics(*server_);
  EXPECT_THAT(out, HasSubstr("adapterd_requests_total{adapter=\"qv\",code=\"OK\"}"));
  EXPECT_THAT(out, HasSubstr("adapterd_generated_tokens_total{adapter=\"qv\"}"));
  EXPECT_THAT(out, HasSubstr("adapterd_time_to_first_token_seconds_bucket"));
  EXPECT_THAT(out, HasSubstr("adapterd_lora_requests_info{"));
  EXPECT_THAT(out, HasSubstr("adapterd_model_info{architecture=\"LlamaForCausalLM\""));
  EXPECT_THAT(out, HasSubstr(",quantization=\"none\",version="));
}

TEST(E2eAdminSafetyTest, TokenRequiredAndPathsConfinedToTheRoot) {
  const std::string dir = TempDir("admin_safety");
  const std::string root = dir + "/root";
  std::filesystem::create_directories(root);
  std::filesystem::copy(Fixture("adapters/lora_qv"), root + "/good",
                        std::filesystem::copy_options::recursive);
  std::filesystem::create_directory_symlink(Fixture("adapters/lora_regex"), root + "/escape");
  WriteFile(dir + "/token", "s3cret\n");
  std::filesystem::permissions(dir + "/token", std::filesystem::perms::owner_read);
  ServerProcess server(Model(), {"--adapter_root=" + root, "--admin_token_file=" + dir + "/token"});
  ASSERT_TRUE(server.ok()) << server.log();
  auto admin = server.Admin();
  auto load = [&](const std::string& token, const std::string& path) {
    grpc::ClientContext ctx;
    if (!token.empty()) ctx.AddMetadata("authorization", token);
    v1::LoadAdapterRequest req;
    req.set_name("x");
    req.set_path(path);
    req.set_validate_only(true);
    v1::LoadAdapterResponse resp;
    return admin->LoadAdapter(&ctx, req, &resp);
  };
  EXPECT_EQ(load("", "good").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(load("Bearer wrong", "good").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(load("s3cret", "good").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(load("Bearer s3cret", "good").ok());
  grpc::Status dotdot = load("Bearer s3cret", "../root/good");
  EXPECT_EQ(dotdot.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(dotdot.error_message(), HasSubstr("contains \"..\""));
  EXPECT_EQ(load("Bearer s3cret", Fixture("adapters/lora_qv")).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  grpc::Status escape = load("Bearer s3cret", "escape");
  EXPECT_EQ(escape.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(escape.error_message(), HasSubstr("resolves outside the adapter root"));
  EXPECT_EQ(load("Bearer s3cret", "missing").error_code(), grpc::StatusCode::NOT_FOUND);
  grpc::ClientContext lctx;
  v1::ListAdaptersResponse list;
  EXPECT_EQ(admin->ListAdapters(&lctx, v1::ListAdaptersRequest(), &list).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
}

// --prefix_cache_bytes: requests sharing leading blocks with earlier ones (base, LoRA, prefix
// and prompt tuning; greedy and seeded) answer as a server without the cache does, bit for
// bit (the fixture is a Llama: every query attends alone and the projections are
// row-independent on the CPU kernels), each response counts its reused prompt tokens, and so
// do the metrics. --kv_cache_dtype shows in the model state.
TEST(E2ePrefixCacheTest, SharedPrefixesAnswerAsWithoutTheCacheAndAreCounted) {
  ServerProcess plain(Model(), {kPreload});
  ServerProcess cached(Model(), {kPreload, "--prefix_cache_bytes=67108864", "--kv_cache_dtype=float32"});
  ASSERT_TRUE(plain.ok()) << plain.log();
  ASSERT_TRUE(cached.ok()) << cached.log();
  std::vector<int32_t> shared = {1};
  for (int i = 0; i < 39; ++i) shared.push_back(300 + 11 * i);
  for (const char* adapter : {"", "qv", "pre", "pt"}) {
    for (int32_t tail : {7, 8, 9}) {
      std::vector<int32_t> ids = shared;
      ids.push_back(tail);
      v1::GenerateRequest req = IdsRequest(ids, adapter, 6);
      req.set_top_logprobs(2);
      if (tail == 9) {
        req.set_temperature(0.8f);
        req.set_seed(5);
      }
      v1::GenerateResponse want, got;
      ASSERT_TRUE(Generate(plain, req, &want).ok());
      ASSERT_TRUE(Generate(cached, req, &got).ok());
      ASSERT_EQ(Ids(got), Ids(want)) << adapter << " " << tail;
      for (int i = 0; i < got.tokens_size(); ++i) {
        EXPECT_EQ(got.tokens(i).logprob(), want.tokens(i).logprob()) << adapter << " " << tail << " token " << i;
        ASSERT_EQ(got.tokens(i).top_logprobs_size(), want.tokens(i).top_logprobs_size());
        for (int k = 0; k < got.tokens(i).top_logprobs_size(); ++k) {
          EXPECT_EQ(got.tokens(i).top_logprobs(k).logprob(), want.tokens(i).top_logprobs(k).logprob());
        }
      }
      // The first request of each adapter fills the cache; the next two reuse its two full
      // blocks (32 tokens). The plain server reuses nothing.
      EXPECT_EQ(got.stats().cached_prompt_tokens(), tail == 7 ? 0u : 32u) << adapter << " " << tail;
      EXPECT_EQ(want.stats().cached_prompt_tokens(), 0u);
    }
  }
  const std::string out = ScrapeMetrics(cached);
  // Each adapter's second and third requests reuse the 32 positions of its first.
  EXPECT_THAT(out, HasSubstr("adapterd_prefix_cache_hit_tokens_total 256"));
  EXPECT_THAT(out, HasSubstr("adapterd_prefix_cache_queried_tokens_total 492"));
  EXPECT_THAT(out, HasSubstr("adapterd_prefix_cache_blocks "));
  grpc::ClientContext ctx;
  v1::GetModelStateRequest state_req;
  v1::ModelState state;
  ASSERT_TRUE(cached.Admin()->GetModelState(&ctx, state_req, &state).ok());
  EXPECT_EQ(state.base().kv_cache_dtype(), "float32");
  EXPECT_EQ(state.base().matmul_precision(), "highest");  // The default.
  EXPECT_FALSE(state.base().bf16_products());
  // The one weight file's size, and of it no more than that in 2 MiB pages.
  const auto file_bytes =
      static_cast<int64_t>(std::filesystem::file_size(Model() + "/model.safetensors"));
  EXPECT_EQ(state.base().bytes_files_held(), file_bytes);
  EXPECT_LE(state.base().bytes_huge_pages(), file_bytes);
  EXPECT_LE(state.base().bytes_reread(), file_bytes);
}

// A --max_kv_bytes pool of 6 blocks (16 positions of 512 bytes on this fixture) where no two
// of these requests (up to 70 positions: 4 prompt tokens, up to 6 virtual, 60 generated) can
// both reach their end: the newest are preempted and recomputed, and every answer over gRPC
// (base, LoRA, prefix and prompt tuning; greedy and seeded) equals the one a roomy server
// gives each request alone, with the prefix cache on too. The metrics count the preemptions
// and the pool.
TEST(E2eKvPoolTest, ATinyPoolPreemptsAndEveryAnswerStaysTheSame) {
  constexpr int64_t kBlockBytes = 16 * 2 * 2 * 2 * 16 * 4;  // Positions·layers·(K,V)·heads·dim·f32.
  ServerProcess roomy(Model(), {kPreload});
  ServerProcess tiny(Model(), {kPreload, "--max_kv_bytes=" + std::to_string(6 * kBlockBytes),
                               "--prefix_cache_bytes=1048576"});
  ASSERT_TRUE(roomy.ok()) << roomy.log();
  ASSERT_TRUE(tiny.ok()) << tiny.log();
  const std::vector<std::string> adapters = {"", "qv", "pre", "pt"};
  std::vector<v1::GenerateRequest> requests;
  for (int i = 0; i < 8; ++i) {
    v1::GenerateRequest req = IdsRequest({1, 450, static_cast<int32_t>(300 + 37 * i), 4996}, adapters[i % 4], 60);
    req.set_ignore_eos(true);
    req.set_top_logprobs(1);
    if (i % 2 == 1) {
      req.set_temperature(0.9f);
      req.set_seed(40 + i);
    }
    requests.push_back(req);
  }
  std::vector<v1::GenerateResponse> want(requests.size()), got(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) ASSERT_TRUE(Generate(roomy, requests[i], &want[i]).ok()) << i;
  std::vector<grpc::Status> status(requests.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < requests.size(); ++i) {
    threads.emplace_back([&, i] { status[i] = Generate(tiny, requests[i], &got[i]); });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_TRUE(status[i].ok()) << i << ": " << status[i].error_message() << "\n" << tiny.log();
    EXPECT_EQ(got[i].tokens_size(), 60) << i;
    EXPECT_EQ(Ids(got[i]), Ids(want[i])) << i;
    for (int k = 0; k < got[i].tokens_size() && k < want[i].tokens_size(); ++k) {
      EXPECT_EQ(got[i].tokens(k).logprob(), want[i].tokens(k).logprob()) << i << " token " << k;
    }
  }
  const std::string out = ScrapeMetrics(tiny);
  EXPECT_THAT(out, HasSubstr("adapterd_kv_blocks{state=\"total\"} 6"));
  EXPECT_THAT(out, Not(HasSubstr("adapterd_preemptions_total 0\n")));
  EXPECT_THAT(out, HasSubstr("adapterd_preemptions_total "));
  // A request that could not finish even alone in the pool is refused at once.
  v1::GenerateResponse refused;
  grpc::Status too_long = Generate(tiny, IdsRequest({1, 2, 3}, "", 100), &refused);
  EXPECT_EQ(too_long.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(too_long.error_message(), HasSubstr("more than the budget of 49152"));
}

// --matmul_precision through the server: the model state says the level and whether the
// bfloat16 products are in effect (they are exactly where the CPU has AVX-512 BF16, as
// /proc/cpuinfo says), and requests are served (the engine tests check the values).
TEST(E2eMatmulPrecisionTest, MediumIsReportedAndServes) {
  bool bf16 = false, avx512 = false;
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream words(line);
    for (std::string w; words >> w;) {
      bf16 = bf16 || w == "avx512_bf16";
      avx512 = avx512 || w == "avx512f";
    }
    break;
  }
  ServerProcess server(Fixture("llama_bf16"), {"--matmul_precision=medium"});
  ASSERT_TRUE(server.ok()) << server.log();
  grpc::ClientContext ctx;
  v1::ModelState state;
  ASSERT_TRUE(server.Admin()->GetModelState(&ctx, v1::GetModelStateRequest(), &state).ok());
  EXPECT_EQ(state.base().matmul_precision(), "medium");
  EXPECT_EQ(state.base().weights_dtype(), "bfloat16");
  EXPECT_EQ(state.base().bf16_products(), bf16 && avx512);
  v1::GenerateResponse resp;
  ASSERT_TRUE(Generate(server, IdsRequest({1, 2, 3, 4}, "", 6), &resp).ok());
  EXPECT_EQ(resp.tokens_size(), 6);
}

// --quantize int8 and int8_weight_only through the server: the model state and the info metric
// report what was quantized, int8 logs its products' kernel, and base and adapter requests are
// served (the engine tests check the values).
TEST(E2eQuantizeTest, Int8ServerReportsItAndServesAdapters) {
  for (const std::string quantize : {"int8", "int8_weight_only"}) {
    SCOPED_TRACE(quantize);
    ServerProcess server(Model(), {kPreload, "--quantize=" + quantize});
    ASSERT_TRUE(server.ok()) << server.log();
    grpc::ClientContext ctx;
    v1::ModelState state;
    ASSERT_TRUE(server.Admin()->GetModelState(&ctx, v1::GetModelStateRequest(), &state).ok());
    EXPECT_EQ(state.base().quantization(), quantize);
    EXPECT_GT(state.base().quantized_tensors(), 0);
    EXPECT_GT(state.base().quantized_source_bytes(), 3 * state.base().quantized_bytes());  // float32 → int8.
    for (const char* adapter : {"", "qv", "pre"}) {
      v1::GenerateResponse resp;
      ASSERT_TRUE(Generate(server, IdsRequest({1, 2, 3, 4}, adapter, 6), &resp).ok()) << adapter;
      EXPECT_EQ(resp.tokens_size(), 6) << adapter;
    }
    const std::string metrics = ScrapeMetrics(server);
    EXPECT_THAT(metrics, HasSubstr(",quantization=\"" + quantize + "\",version="));
    EXPECT_THAT(metrics, HasSubstr(",weights_dtype=\"float32\"} 1"));
    if (quantize == "int8") {
      EXPECT_THAT(server.log(), ::testing::ContainsRegex("int8 products: (avx512vnni|avx2|none) kernel"));
    } else {
      EXPECT_THAT(server.log(), Not(HasSubstr("int8 products")));
    }
  }
}

// --quantize bf16_packed through the server: the model state and the info metric report the
// packed copies, and base and LoRA requests give the tokens the unpacked server gives (the
// engine tests check the logits bit for bit).
TEST(E2eQuantizeTest, Bf16PackedServerServesWhatTheUnpackedOneDoes) {
  const std::string model = Fixture("llama_bf16_wide");
  ServerProcess plain(model, {"--preload=wide=lora_bf16_wide"});
  ServerProcess packed(model, {"--preload=wide=lora_bf16_wide", "--quantize=bf16_packed"});
  ASSERT_TRUE(plain.ok()) << plain.log();
  ASSERT_TRUE(packed.ok()) << packed.log();
  grpc::ClientContext ctx;
  v1::ModelState state;
  ASSERT_TRUE(packed.Admin()->GetModelState(&ctx, v1::GetModelStateRequest(), &state).ok());
  EXPECT_EQ(state.base().quantization(), "bf16_packed");
  EXPECT_EQ(state.base().quantized_tensors(), 2 * 7 + 1);
  EXPECT_GT(state.base().quantized_source_bytes(), state.base().quantized_bytes());
  for (const char* adapter : {"", "wide"}) {
    v1::GenerateResponse a, b;
    ASSERT_TRUE(Generate(plain, IdsRequest({1, 2, 3, 4}, adapter, 8), &a).ok()) << adapter;
    ASSERT_TRUE(Generate(packed, IdsRequest({1, 2, 3, 4}, adapter, 8), &b).ok()) << adapter;
    EXPECT_EQ(b.token_ids_size(), 8) << adapter;
    EXPECT_EQ(std::vector<int32_t>(a.token_ids().begin(), a.token_ids().end()),
              std::vector<int32_t>(b.token_ids().begin(), b.token_ids().end()))
        << adapter;
  }
  const std::string metrics = ScrapeMetrics(packed);
  EXPECT_THAT(metrics, HasSubstr(",quantization=\"bf16_packed\",version="));
  EXPECT_THAT(metrics, HasSubstr(",weights_dtype=\"bfloat16\"} 1"));
}

TEST(E2eLimitsTest, FullQueueIsRefusedAtOnce) {
  ServerProcess server(Model(), {"--max_queue=1", "--max_batch_rows=1"});
  ASSERT_TRUE(server.ok()) << server.log();
  std::atomic<int> ok{0}, exhausted{0}, other{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      v1::GenerateResponse resp;
      grpc::Status s = Generate(server, IdsRequest({1, 2, static_cast<int32_t>(i)}, "", 120), &resp);
      if (s.ok()) {
        ok.fetch_add(1);
      } else if (s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
        EXPECT_THAT(s.error_message(), HasSubstr("admission queue is full"));
        exhausted.fetch_add(1);
      } else {
        other.fetch_add(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  // Eight near-simultaneous requests, one row and one queue slot: some run, the rest are
  // refused at once (how many run depends on when the first leaves the queue).
  EXPECT_GE(exhausted.load(), 1);
  EXPECT_GE(ok.load(), 1);
  EXPECT_EQ(ok.load() + exhausted.load(), 8);
  EXPECT_EQ(other.load(), 0);
}

// grpc.health.v1.Health/Check for the whole server over `channel`: "SERVING", "NOT_SERVING",
// "UNKNOWN", or "" when the call fails.
std::string HealthOf(const std::shared_ptr<grpc::Channel>& channel) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::Slice empty("");  // HealthCheckRequest{service: ""}.
  grpc::ByteBuffer request(&empty, 1), response;
  grpc::CompletionQueue cq;
  auto call = stub.PrepareUnaryCall(&ctx, "/grpc.health.v1.Health/Check", request, &cq);
  call->StartCall();
  grpc::Status status;
  call->Finish(&response, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  if (!status.ok()) return "";
  std::vector<grpc::Slice> slices;
  (void)response.Dump(&slices);
  std::string bytes;
  for (const auto& slice : slices) bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  if (bytes == std::string("\x08\x01", 2)) return "SERVING";
  if (bytes == std::string("\x08\x02", 2)) return "NOT_SERVING";
  return "UNKNOWN";
}

TEST(E2eShutdownTest, SigtermDrainsInFlightStreamsAndExitsZero) {
  ServerProcess server(Model(), {"--grace_period_s=30"});
  ASSERT_TRUE(server.ok()) << server.log();
  // adapterctl's view first; during the drain an open channel probes (a new process per probe
  // could miss a drain that lasts only as long as the stream's last tokens).
  const std::string cmd = AdapterdBinary().substr(0, AdapterdBinary().rfind('/')) +
                          "/adapterctl health --addr " + server.address() + " 2>/dev/null";
  FILE* p = ::popen(cmd.c_str(), "r");
  char buf[64] = {0};
  const std::string health_before = std::fgets(buf, sizeof(buf), p) ? buf : "";
  ::pclose(p);
  EXPECT_EQ(health_before, "SERVING\n");
  auto channel = grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials());
  ASSERT_EQ(HealthOf(channel), "SERVING");
  v1::GenerateResponse streamed;
  int exit_code = -2;
  std::string health_during_drain;
  grpc::Status s = Stream(server, IdsRequest({1, 2, 3}, "", 80), &streamed, [&](int chunk) {
    if (chunk != 0) return;
    std::thread([&] { exit_code = server.SignalAndWait(SIGTERM, 60); }).detach();
    // Health turns NOT_SERVING while the stream drains.
    for (int i = 0; i < 20000 && health_during_drain != "NOT_SERVING"; ++i) {
      health_during_drain = HealthOf(channel);
      if (health_during_drain.empty()) break;  // Gone: it exited without saying so.
    }
  });
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(streamed.token_ids_size(), 80);
  EXPECT_EQ(streamed.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(health_during_drain, "NOT_SERVING");
  for (int i = 0; i < 3000 && exit_code == -2; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(exit_code, 0);
}

}  // namespace
}  // namespace adapterd::testing
