// Command-line flags shared by the adapterd subcommands (defined in flags.cc).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/flags/declare.h"

ABSL_DECLARE_FLAG(std::string, model_dir);
ABSL_DECLARE_FLAG(std::string, adapter_dir);
ABSL_DECLARE_FLAG(std::string, device);
ABSL_DECLARE_FLAG(std::string, dtype);
ABSL_DECLARE_FLAG(int32_t, threads);
ABSL_DECLARE_FLAG(std::string, cpu_kernels);
ABSL_DECLARE_FLAG(bool, json);
ABSL_DECLARE_FLAG(std::string, prompt_ids);
ABSL_DECLARE_FLAG(std::string, prompt);
ABSL_DECLARE_FLAG(std::string, text);
ABSL_DECLARE_FLAG(std::string, ids);
ABSL_DECLARE_FLAG(bool, add_special_tokens);
ABSL_DECLARE_FLAG(bool, skip_special_tokens);
ABSL_DECLARE_FLAG(int64_t, max_new_tokens);
ABSL_DECLARE_FLAG(float, temperature);
ABSL_DECLARE_FLAG(int32_t, top_k);
ABSL_DECLARE_FLAG(float, top_p);
ABSL_DECLARE_FLAG(float, repetition_penalty);
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_DECLARE_FLAG(int32_t, top_logprobs);
ABSL_DECLARE_FLAG(bool, ignore_eos);
ABSL_DECLARE_FLAG(std::string, log_level);
ABSL_DECLARE_FLAG(std::string, log_format);
ABSL_DECLARE_FLAG(std::string, listen);
ABSL_DECLARE_FLAG(std::string, admin_listen);
ABSL_DECLARE_FLAG(std::string, metrics_listen);
ABSL_DECLARE_FLAG(std::string, adapter_root);
ABSL_DECLARE_FLAG(std::string, admin_token_file);
ABSL_DECLARE_FLAG(std::string, port_file);
ABSL_DECLARE_FLAG(std::vector<std::string>, preload);
ABSL_DECLARE_FLAG(int64_t, max_batch_rows);
ABSL_DECLARE_FLAG(int64_t, max_tokens_per_step);
ABSL_DECLARE_FLAG(int64_t, max_queue);
ABSL_DECLARE_FLAG(int64_t, max_kv_bytes);
ABSL_DECLARE_FLAG(int64_t, max_adapters);
ABSL_DECLARE_FLAG(int64_t, max_adapter_bytes);
ABSL_DECLARE_FLAG(int64_t, default_max_new_tokens);
ABSL_DECLARE_FLAG(int64_t, max_new_tokens_limit);
ABSL_DECLARE_FLAG(double, grace_period_s);
