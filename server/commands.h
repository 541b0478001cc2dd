// The offline subcommands of the adapterd executable: inspect a model folder and generate
// from it without a server. Each returns the process exit code.
#pragma once

#include <string>
#include <vector>

namespace adapterd::server {

// `adapterd inspect --model_dir DIR [--json]`: prints the load report; exit 1 when refused.
int RunInspect();
// `adapterd generate --model_dir DIR --prompt_ids 1,2,3 --max_new_tokens N [--json]`.
int RunGenerate();

// Parses "1,2,3" into ids; false on anything that is not a comma-separated integer list.
bool ParseIdList(const std::string& text, std::vector<int32_t>* ids);

}  // namespace adapterd::server
