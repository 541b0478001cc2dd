// What the gRPC services share: the engine, tokenizer, adapter table, scheduler and metrics,
// plus serving limits. Built by `adapterd serve`; the model parts are set once loading
// finishes (until then `ready` is false and generation answers UNAVAILABLE).
//
// Thread-safety: fields are set before `ready` is published and read-only afterwards.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "adapters/adapter_mix.h"
#include "adapters/adapter_table.h"
#include "core/engine.h"
#include "core/tokenizer.h"
#include "grpcpp/grpcpp.h"
#include "jinja/chat_template.h"
#include "server/generate_request.h"
#include "server/metrics.h"
#include "server/scheduler.h"

namespace adapterd::server {

class AdapterResidency;

struct ServingContext {
  std::atomic<bool> ready{false};
  std::atomic<bool> draining{false};  // Set once shutdown begins.
  std::unique_ptr<core::Engine> engine;
  std::string model_dir;
  std::unique_ptr<core::Tokenizer> tokenizer;  // Null when the model folder has none.
  // The model's chat template; null (with the reason) when it has none or it cannot be used.
  std::unique_ptr<jinja::ChatTemplate> chat_template;
  std::string chat_template_error;
  std::unique_ptr<adapters::AdapterTable> table;
  // Every load, on-demand loading and eviction go through it (server/adapter_residency.h).
  std::unique_ptr<AdapterResidency> residency;
  // Recent weighted mixes (GenerateRequest.adapters); null builds every mix anew.
  std::unique_ptr<adapters::MixCache> mixes;
  std::unique_ptr<Scheduler> scheduler;
  Metrics metrics;
  RequestRules limits;  // vocab_size and context_length are the engine's, set per request.
  std::string adapter_root;  // Canonical absolute path.
  std::string admin_token;   // Empty: no authentication.
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  std::atomic<uint64_t> next_request_id{1};
};

// Converts a Status to a grpc::Status (the codes share their numbers).
grpc::Status ToGrpc(const absl::Status& status);

}  // namespace adapterd::server
