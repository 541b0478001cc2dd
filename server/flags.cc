#include "server/flags.h"

#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"

ABSL_FLAG(std::string, model_dir, "", "Hugging Face model folder (config.json + safetensors).");
ABSL_FLAG(std::string, adapter_dir, "",
          "PEFT adapter folder to validate (inspect) or run with (generate).");
ABSL_FLAG(std::string, device, "cpu", "Device the model runs on (cpu, cuda:0, ...).");
ABSL_FLAG(std::string, dtype, "auto",
          "Compute dtype: auto (float32 activations; a Llama-family checkpoint's bfloat16 or "
          "float16 weight matrices served in place, not converted), float32 (every tensor "
          "converted), float16 or bfloat16.");
ABSL_FLAG(int32_t, threads, static_cast<int32_t>(std::thread::hardware_concurrency()),
          "Intra-op threads for the model (default: the machine's cores).");
ABSL_FLAG(std::string, cpu_kernels, "auto",
          "CPU float32 kernels for few-row steps: auto (best this CPU has), avx512f, avx2 or "
          "none (ATen/BLAS only).");
ABSL_FLAG(std::string, kv_cache_dtype, "auto",
          "KV cache dtype: auto (the dtype the weights are served in, --dtype; float16 for "
          "float32 weights under --quantize), float32, bfloat16 or float16. A half-precision "
          "cache holds twice the positions in the same --max_kv_bytes.");
ABSL_FLAG(std::string, matmul_precision, "highest",
          "How the base model multiplies by bfloat16 weights (torch.set_float32_matmul_precision's "
          "levels): highest (exactly as their float32 copy), high (the same here) or medium (each "
          "input rounded to bfloat16 and AVX-512 BF16 dot products, where the CPU has them; faster "
          "decode, activations rounded as a bfloat16 model rounds them). Adapters stay in full "
          "precision.");
ABSL_FLAG(int64_t, prefix_cache_bytes, 0,
          "Bytes of prompt keys and values kept for reuse by later requests that start with the "
          "same 16-token blocks and use the same adapter; 0 turns prefix reuse off.");
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
ABSL_FLAG(std::string, log_format, "text", "Log format: text or json.");
ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "Generation listener (Generation, health, reflection); port 0 picks a free port.");
ABSL_FLAG(std::string, admin_listen, "127.0.0.1:50052",
          "Admin listener (Admin, health); loopback by default.");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9400", "Prometheus /metrics listener.");
ABSL_FLAG(std::string, adapter_root, ".", "Folder adapter paths are resolved in.");
ABSL_FLAG(std::string, admin_token_file, "",
          "File holding the admin bearer token; empty: admin calls need no token.");
ABSL_FLAG(std::string, port_file, "",
          "Once serving, write the bound ports as JSON {listen, admin, metrics} here.");
ABSL_FLAG(std::vector<std::string>, preload, {},
          "Adapters to load at start: name=relative/path, comma-separated.");
ABSL_FLAG(bool, pin_preloaded, true, "Pin --preload adapters: never evict them (see --load_on_demand).");
ABSL_FLAG(bool, load_on_demand, false,
          "A request naming an adapter that is not loaded loads the folder of that name under "
          "--adapter_root (waiting requests share one load) and, when the resident set is full, "
          "evicts the least recently used idle unpinned adapter.");
ABSL_FLAG(double, adapter_failure_ttl_s, 10.0,
          "With --load_on_demand, how long a failed load answers requests with its error before "
          "a request may retry it.");
ABSL_FLAG(std::string, adapter_dtype, "auto",
          "How a float32 CPU model holds LoRA factors: auto (bfloat16 files in bfloat16, others "
          "in the model's dtype) or bfloat16 (all in bfloat16: half the memory and the bytes a "
          "step over many adapters reads; float32 and float16 factors are rounded once at load).");
ABSL_FLAG(int64_t, max_batch_rows, 32, "Most sequences in one model step.");
ABSL_FLAG(int64_t, max_tokens_per_step, 512,
          "Most tokens run in one step: decode rows take one each, prompts share the rest, a "
          "longer prompt is prefilled in chunks over several steps (chunked prefill).");
ABSL_FLAG(double, max_step_slowdown, 0,
          "0: off. Above 1: while streams are decoding, a step that also runs prompt chunks is "
          "sized to take at most this many times a decode-only step (both measured as it runs), "
          "so long arrivals slow running streams by at most this factor at the cost of their own "
          "time to first token. Within --max_tokens_per_step.");
ABSL_FLAG(int64_t, max_queue, 256, "Waiting requests before RESOURCE_EXHAUSTED.");
ABSL_FLAG(int64_t, max_kv_bytes, int64_t{4} << 30, "KV cache budget over running requests.");
ABSL_FLAG(int64_t, max_adapters, 64, "Most adapters resident at once.");
ABSL_FLAG(int64_t, max_adapter_bytes, int64_t{8} << 30, "Most bytes held by resident adapters.");
ABSL_FLAG(int64_t, mix_cache_size, 8,
          "Weighted mixes (GenerateRequest.adapters) kept built for reuse; each holds a copy of its "
          "parts' factors. 0 builds every mix anew.");
ABSL_FLAG(int64_t, default_max_new_tokens, 256, "max_new_tokens when a request leaves it 0.");
ABSL_FLAG(int64_t, max_new_tokens_limit, 4096, "Largest max_new_tokens a request may ask for.");
ABSL_FLAG(double, grace_period_s, 20.0,
          "On SIGTERM, seconds in-flight requests get to finish before being cancelled.");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain: every listener (generation, admin, metrics) serves TLS.");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert.");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle: clients must present a certificate it signed (mutual TLS).");
ABSL_FLAG(int32_t, tls_reload_interval_s, 10,
          "How often the gRPC listeners re-read the TLS files (rotation without a restart).");
ABSL_FLAG(double, adapter_load_timeout_s, 30.0,
          "An adapter load still running after this many seconds is abandoned and refused.");
ABSL_FLAG(
    std::string, quantize, "none",
    "none | int8 | int8_weight_only | bf16_packed: serve a Llama-family model's projection "
    "matrices and lm_head as "
    "int8, quantized at load (blocks of 32 inputs with a float32 scale each, as llama.cpp's Q8_0); "
    "adapters still apply in full precision. int8 also quantizes each projection's input per block "
    "of 32 "
    "at run time and sums the products in int32, as llama.cpp's Q8_0 does (w8a8; \"w8a8\" is "
    "accepted "
    "for it); int8_weight_only multiplies the float32 activations by the dequantized weights "
    "(slower, "
    "slightly more exact). bf16_packed holds a bfloat16 checkpoint's matrices losslessly in 12 "
    "bits a weight "
    "(each row's 15 most frequent sign-and-exponent bytes as 4-bit codes), the same results bit "
    "for bit as "
    "unpacked from a quarter fewer bytes read per token (AVX-512 BW kernels; elsewhere unpacked "
    "block by "
    "block, slower). Needs --dtype auto or float32.");
ABSL_FLAG(bool, mmap, true,
          "Map the model's weight files (zero copy); false reads them into private memory.");
ABSL_FLAG(bool, mmap_refresh_small_pages, true,
          "With --mmap: a weight file the page cache holds in small pages (just written or "
          "copied), so that under half of it would be mapped with 2 MiB pages, is dropped from the "
          "cache and read again at load, in 2 MiB pages (a decode step streams every weight). "
          "Costs one read of that file; the load report says how much was read again.");
ABSL_FLAG(std::string, messages_json, "",
          "File with a JSON list of chat messages to render (chat-template).");
ABSL_FLAG(bool, add_generation_prompt, false,
          "End the rendered chat with the template's assistant prompt (chat-template).");
ABSL_FLAG(std::string, chat_template_kwargs, "",
          "JSON object of extra chat-template variables, e.g. {\"enable_thinking\": false}.");
ABSL_FLAG(std::string, http_listen, "",
          "OpenAI-compatible HTTP listener (host:port); empty: off.");
ABSL_FLAG(bool, http_admin, false,
          "Serve /v1/load_lora_adapter and /v1/unload_lora_adapter on --http_listen (admin token "
          "as Bearer; off loopback it needs --admin_token_file and TLS).");
ABSL_FLAG(std::string, api_key_file, "",
          "File holding the API key every HTTP call but /health and /metrics must send as "
          "\"Authorization: Bearer <key>\".");
ABSL_FLAG(std::string, served_model_name, "",
          "The base model's id in the HTTP API's `model` field; empty: the model folder's name.");
ABSL_FLAG(int32_t, http_threads, 256,
          "HTTP worker threads: each open HTTP request (a stream) holds one.");
