#include "server/flags.h"

#include <thread>

#include "absl/flags/flag.h"

ABSL_FLAG(std::string, model_dir, "", "Hugging Face model folder (config.json + safetensors).");
ABSL_FLAG(std::string, adapter_dir, "",
          "PEFT adapter folder to validate (inspect) or run with (generate).");
ABSL_FLAG(std::string, device, "cpu", "Device the model runs on (cpu, cuda:0, ...).");
ABSL_FLAG(std::string, dtype, "float32", "Compute dtype: float32, float16 or bfloat16.");
ABSL_FLAG(int32_t, threads, static_cast<int32_t>(std::thread::hardware_concurrency()),
          "Intra-op threads for the model (default: the machine's cores).");
ABSL_FLAG(bool, json, false, "Print machine-readable JSON instead of text.");
ABSL_FLAG(std::string, prompt_ids, "", "Prompt as comma-separated token ids (generate).");
ABSL_FLAG(std::string, prompt, "", "Prompt as text, tokenized with the model's tokenizer.json.");
ABSL_FLAG(std::string, text, "", "Text to tokenize (tokenize).");
ABSL_FLAG(std::string, ids, "", "Comma-separated token ids to detokenize (detokenize).");
ABSL_FLAG(bool, add_special_tokens, true, "Apply the tokenizer's template (e.g. BOS).");
ABSL_FLAG(bool, skip_special_tokens, false, "Leave special tokens out of decoded text.");
ABSL_FLAG(int64_t, max_new_tokens, 16, "Most tokens to generate (generate).");
ABSL_FLAG(float, temperature, 0.0f, "Sampling temperature; 0 = greedy (generate).");
ABSL_FLAG(int32_t, top_k, 0, "Keep the k most likely tokens; 0 = off (generate).");
ABSL_FLAG(float, top_p, 1.0f, "Nucleus sampling mass; 1 = off (generate).");
ABSL_FLAG(float, repetition_penalty, 1.0f, "Repetition penalty; 1 = off (generate).");
ABSL_FLAG(uint64_t, seed, 0, "Seed of the request's random generator (generate).");
ABSL_FLAG(int32_t, top_logprobs, 5, "Alternatives reported per generated token (generate).");
ABSL_FLAG(bool, ignore_eos, false, "Keep generating past end-of-sequence ids (generate).");
ABSL_FLAG(std::string, log_level, "info", "spdlog level: trace, debug, info, warn, error.");
