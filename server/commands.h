// The offline subcommands of the adapterd executable: inspect a model folder and generate
// from it without a server. Each returns the process exit code.
#pragma once

#include <string>
#include <vector>

namespace adapterd::server {

// `adapterd inspect --model_dir DIR [--adapter_dir DIR] [--json]`: prints the model's load
// report, or the adapter's validation report (a dry run); exit 1 when refused.
int RunInspect();
// `adapterd generate --model_dir DIR [--adapter_dir DIR] (--prompt_ids 1,2,3 | --prompt TEXT)
// --max_new_tokens N [--json]`.
int RunGenerate();

// `adapterd tokenize --model_dir DIR --text "..." [--json]`: prints the ids.
int RunTokenize();
// `adapterd detokenize --model_dir DIR --ids 1,2,3 [--json]`: prints the text.
int RunDetokenize();
// `adapterd chat-template`: renders --messages_json with the model's chat template to stdout,
// exactly the text a chat request is tokenized from.
int RunChatTemplate();

// Returns the last path component of an adapter folder, used as its name.
std::string AdapterNameOf(const std::string& dir);

// Parses "1,2,3" into ids; false on anything that is not a comma-separated integer list.
bool ParseIdList(const std::string& text, std::vector<int32_t>* ids);

}  // namespace adapterd::server
