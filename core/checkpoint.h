// The tensors of a Hugging Face model folder: `model.safetensors`, or
// `model.safetensors.index.json` and the shards its weight_map names (the same precedence as
// transformers). Pickled `pytorch_model.bin` files are refused: they execute code on load.
//
// Thread-safety: immutable after Open(); any thread may read it.
#pragma once

#include <map>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"
#include "core/safetensors.h"

namespace adapterd::core {

class Checkpoint {
 public:
  struct Entry {
    std::shared_ptr<const SafetensorsFile> file;
    const TensorInfo* info;
  };

  // Opens the checkpoint in `dir`. A tensor listed in the index but absent from its shard, or
  // present in two files, is an error naming both.
  // `mode`: map the files (zero copy) or read them into private memory;
  // `refresh_small_pages`: see SafetensorsFile::Open.
  static absl::StatusOr<Checkpoint> Open(const std::string& dir,
                                         SafetensorsFile::Mode mode = SafetensorsFile::Mode::kMap,
                                         bool refresh_small_pages = false);

  const std::vector<std::shared_ptr<const SafetensorsFile>>& files() const { return files_; }
  const std::map<std::string, Entry, std::less<>>& entries() const { return entries_; }
  const Entry* Find(absl::string_view name) const;

 private:
  std::vector<std::shared_ptr<const SafetensorsFile>> files_;
  std::map<std::string, Entry, std::less<>> entries_;
};

}  // namespace adapterd::core
