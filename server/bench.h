// `adapterctl bench`: a load generator for capacity planning. It drives a running adapterd
// over gRPC (GenerateStream) or over the OpenAI HTTP front (streamed /v1/completions), closed
// loop at a sweep of concurrencies or open loop at a sweep of Poisson request rates, with
// prompt and output lengths fixed or drawn from a distribution (or prompts from a JSONL file)
// and adapters chosen none / one / uniform / Zipf over a list or a folder. It records every
// request's timings (start, time to first token, inter-token latencies, end) and status,
// scrapes the server's metrics before and after, and writes one JSON file with a summary per
// level and per adapter. `adapterctl bench report` turns that file into PNG charts and an
// index.html (tests/bench/../server/bench_report.py, Debian's python3-matplotlib).
//
// Thread-safety: single use from main; it runs its own client threads.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "grpcpp/grpcpp.h"

namespace adapterd::bench {

// Returns the process exit code: 0 when every request was answered (whatever its status), 2
// for a bad scenario (named), 1 when the run itself failed.
int RunBench(std::shared_ptr<grpc::Channel> channel);

// `adapterctl bench report RESULTS.json --out DIR`.
int RunReport(const std::vector<std::string>& args, const std::string& self_path);

}  // namespace adapterd::bench
