// Sizes the prompt share of each step so that a step carrying prefill chunks beside decoding
// streams takes at most `slowdown` times a decode-only step, both measured as the server runs
// (--max_step_slowdown). A token budget alone (--max_tokens_per_step) cannot do this: what a
// prompt token costs grows with the context its chunk attends over, so a budget that is cheap
// at the start of a 4,000-token prompt stalls the streams several times over near its end.
//
// The rule, per step with decode rows:
//   - the baseline is the median duration of the last kSamples decode-only steps (one step's
//     time swings by a fifth); while there is none, or the newest is older than kRefreshSteps
//     governed steps, or they were measured at a decode row count more than a quarter away from
//     today's (the samples then start over), the step runs decode-only (prompts wait one step)
//     to measure it;
//   - otherwise prompts may take `chunk` tokens: it starts at kStartChunk and doubles after every
//     step under 85% of the target (slowdown × baseline) until a step first goes over; from then
//     on it shrinks by a third after a step over the target and grows by a sixth after one under
//     85% of it, within [1, max_tokens]. Going down to one token matters: near the end of a
//     long prompt even a few tokens' attention over its context can cost more than the target.
// Steps without decode rows are not governed: nobody waits on them.
//
// Thread-safety: none; owned by the scheduler's loop thread.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>

namespace adapterd::server {

class StepGovernor {
 public:
  static constexpr int64_t kStartChunk = 16;
  static constexpr int64_t kRefreshSteps = 32;
  static constexpr size_t kSamples = 8;

  // `slowdown` <= 0 turns the governor off: every step may take `max_tokens`.
  StepGovernor(double slowdown, int64_t max_tokens)
      : slowdown_(slowdown), max_tokens_(max_tokens), chunk_(std::min(kStartChunk, max_tokens)) {}

  bool enabled() const { return slowdown_ > 0; }

  // The tokens the next step may carry, its `decode_rows` decode rows (one token each) included.
  // Equal to decode_rows when the step is to run decode-only.
  int64_t Budget(int64_t decode_rows) const {
    if (!enabled() || decode_rows == 0) return max_tokens_;
    if (NeedsBaseline(decode_rows)) return decode_rows;
    return std::max(decode_rows + 1, std::min(max_tokens_, decode_rows + chunk_));
  }

  // Records a finished step: its duration, its decode rows and the prompt tokens it ran.
  void Observe(double seconds, int64_t decode_rows, int64_t prefill_tokens) {
    if (!enabled() || decode_rows == 0) return;
    if (prefill_tokens == 0) {
      if (count_ == 0 || RowsMoved(decode_rows)) {
        count_ = 0;
        baseline_rows_ = decode_rows;
      }
      samples_[count_ % kSamples] = seconds;  // Once full, the oldest is replaced.
      ++count_;
      std::array<double, kSamples> sorted = samples_;
      const size_t n = std::min(count_, kSamples);
      std::nth_element(sorted.begin(), sorted.begin() + n / 2, sorted.begin() + n);
      baseline_ = sorted[n / 2];
      since_baseline_ = 0;
      return;
    }
    ++since_baseline_;
    if (baseline_ <= 0) return;
    const double target = slowdown_ * baseline_;
    if (seconds > target) {
      chunk_ = std::max<int64_t>(1, chunk_ * 2 / 3);
      ramping_ = false;
    } else if (seconds < 0.85 * target) {
      chunk_ = std::min(max_tokens_, ramping_ ? 2 * chunk_ : chunk_ + std::max<int64_t>(1, chunk_ / 6));
    }
  }

  double baseline_seconds() const { return baseline_; }
  int64_t chunk() const { return chunk_; }

 private:
  bool RowsMoved(int64_t rows) const { return std::abs(rows - baseline_rows_) * 4 > baseline_rows_; }
  bool NeedsBaseline(int64_t rows) const {
    return baseline_ <= 0 || since_baseline_ >= kRefreshSteps || RowsMoved(rows);
  }

  double slowdown_;
  int64_t max_tokens_;
  int64_t chunk_;
  double baseline_ = 0;  // Median seconds of the decode-only samples; 0 until one is measured.
  std::array<double, kSamples> samples_{};  // The last decode-only steps' seconds, a ring.
  size_t count_ = 0;     // Samples taken since the row count last moved.
  int64_t baseline_rows_ = 0;
  int64_t since_baseline_ = 0;  // Governed steps since the last decode-only sample.
  bool ramping_ = true;         // No step has gone over the target yet: the chunk doubles.
};

}  // namespace adapterd::server
