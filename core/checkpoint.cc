#include "core/checkpoint.h"

#include <set>
#include <sys/stat.h>

#include "absl/strings/str_cat.h"
#include "core/model_config.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace adapterd::core {
namespace {

bool Exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

}  // namespace

absl::StatusOr<Checkpoint> Checkpoint::Open(const std::string& dir, SafetensorsFile::Mode mode,
                                            bool refresh_small_pages) {
  Checkpoint ckpt;
  const std::string single = dir + "/model.safetensors";
  const std::string index_path = dir + "/model.safetensors.index.json";
  auto add_file = [&](const std::string& path) -> absl::Status {
    ASSIGN_OR_RETURN(auto file,
                     SafetensorsFile::Open(path, FileRules(), mode, refresh_small_pages));
    for (const TensorInfo& info : file->tensors()) {
      auto [it, inserted] = ckpt.entries_.emplace(info.name, Entry{file, &info});
      if (!inserted) {
        return absl::InvalidArgumentError(absl::StrCat("tensor \"", info.name, "\" is in both ",
                                                       it->second.file->path(), " and ", path));
      }
    }
    ckpt.files_.push_back(std::move(file));
    return absl::OkStatus();
  };

  if (Exists(single)) {
    RETURN_IF_ERROR(add_file(single));
    return ckpt;
  }
  if (!Exists(index_path)) {
    std::string hint;
    if (Exists(dir + "/pytorch_model.bin") || Exists(dir + "/pytorch_model.bin.index.json")) {
      hint = " (pickled pytorch_model.bin checkpoints are not loaded: convert to safetensors)";
    }
    return absl::NotFoundError(absl::StrCat(dir, ": no model.safetensors or ",
                                            "model.safetensors.index.json", hint));
  }
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(index_path));
  auto index = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
      !index["weight_map"].is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(index_path, ": not a JSON object with a \"weight_map\" object"));
  }
  std::set<std::string> shards;
  for (auto& [name, shard] : index["weight_map"].items()) {
    if (!shard.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": weight_map entry for \"", name, "\" is not a file name"));
    }
    const std::string file = shard.get<std::string>();
    if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..") {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": shard name \"", file,
                                                     "\" must be a plain file name"));
    }
    shards.insert(file);
  }
  for (const std::string& shard : shards) RETURN_IF_ERROR(add_file(dir + "/" + shard));
  for (auto& [name, shard] : index["weight_map"].items()) {
    auto it = ckpt.entries_.find(name);
    const std::string expected = dir + "/" + shard.get<std::string>();
    if (it == ckpt.entries_.end() || it->second.file->path() != expected) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map puts \"", name,
                                                     "\" in ", expected,
                                                     " but that shard does not hold it"));
    }
  }
  for (const auto& [name, entry] : ckpt.entries_) {
    if (!index["weight_map"].contains(name)) {
      return absl::InvalidArgumentError(absl::StrCat(entry.file->path(), ": tensor \"", name,
                                                     "\" is not listed in ", index_path));
    }
  }
  return ckpt;
}

const Checkpoint::Entry* Checkpoint::Find(absl::string_view name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

}  // namespace adapterd::core
