// Benchmark (printed figures, not a test): llama.cpp's single-stream decode and prefill speed on a
// GGUF written by make_gguf.py from the same checkpoint adapterd's decode_bench runs, through
// node-llama-cpp (npm), on the CPU with the same thread count. The prompt and the tokens decoded
// are the same ids decode_bench uses, fed as ids (no tokenizer involved), with the same warm-ups.
// Usage: node llama_cpp_bench.mjs NODE_MODULES_DIR MODEL.gguf [NEW_TOKENS=32] [THREADS=2] [PROMPT_TOKENS=128]
import { createRequire } from "node:module";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [modules, modelPath, newTokensArg, threadsArg, promptArg] = process.argv.slice(2);
if (!modules || !modelPath) {
  console.error("usage: node llama_cpp_bench.mjs NODE_MODULES_DIR MODEL.gguf [NEW_TOKENS] [THREADS] [PROMPT_TOKENS]");
  process.exit(2);
}
const newTokens = Number(newTokensArg ?? 32);
const threads = Number(threadsArg ?? 2);
const promptTokens = Number(promptArg ?? 128);
const require = createRequire(path.join(path.resolve(modules), "noop.js"));
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(require.resolve("node-llama-cpp")).href);

const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error, maxThreads: threads });
let t0 = performance.now();
const model = await llama.loadModel({ modelPath, gpuLayers: 0, useMmap: true });
const loadS = (performance.now() - t0) / 1000;
const context = await model.createContext({
  contextSize: Math.max(1024, promptTokens + newTokens + 32),
  batchSize: Math.max(512, promptTokens),
  threads,
});
console.log(`model            ${path.basename(modelPath)} (${model.fileInfo.metadata.general.file_type === 7 ? "Q8_0" : "F16"}), load ${loadS.toFixed(3)} s, llama.cpp via node-llama-cpp, ${threads} threads`);

// Decode: the 16-token prompt decode_bench uses, then greedy tokens.
const seq = context.getSequence();
const prompt16 = Array.from({ length: 16 }, (_, i) => 100 + 37 * i);
let n = 0;
let start = 0;
const greedy = [];
for await (const token of seq.evaluate(prompt16, { temperature: 0 })) {
  greedy.push(token);
  // The prefill's token and 3 warm-up steps, as decode_bench's, then newTokens timed.
  if (n === 3) start = performance.now();
  if (++n > newTokens + 3) break;
}
const decodeS = (performance.now() - start) / 1000;
console.log(`greedy           ${greedy.slice(0, 8).join(" ")} (the first 8 ids after decode_bench's prompt: compare with adapterd generate --prompt_ids)`);
console.log(`decode           ${(newTokens / decodeS).toFixed(2)} tokens/s (${(1000 * decodeS / newTokens).toFixed(2)} ms/token over ${newTokens} tokens)`);

// Prefill: decode_bench's prompt of promptTokens ids in one evaluation; a warm-up, then best of 2.
const vocab = Number(model.fileInfo.metadata.llama?.vocab_size ?? 32000);
const prompt = Array.from({ length: promptTokens }, (_, i) => (101 + 7919 * i) % vocab);
let best = Infinity;
for (let round = 0; round < 3; ++round) {
  await seq.clearHistory();
  t0 = performance.now();
  await seq.evaluateWithoutGeneratingNewTokens(prompt);
  if (round > 0) best = Math.min(best, (performance.now() - t0) / 1000);
}
console.log(`prefill          ${(promptTokens / best).toFixed(1)} tokens/s (a ${promptTokens}-token prompt, best of 2)`);
await context.dispose();
await model.dispose();
await llama.dispose();
