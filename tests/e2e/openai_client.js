// adapterd's HTTP front driven by the official `openai` npm client (not our code): models,
// completions and chat, streaming and not, n > 1 with a seed, logprobs, stop, usage in
// streams, adapters chosen by `model`, and the client's typed errors for each error class.
// Prints "N passed, N failed"; exits 1 on a failure.
// Usage: node openai_client.js NPM_DIR PORT API_KEY
const path = require("path");
const OpenAI = require(path.join(path.resolve(process.argv[2]), "node_modules", "openai"));
const port = process.argv[3];
const apiKey = process.argv[4];

let passed = 0, failed = 0;
function check(name, cond, detail) {
  if (cond) { passed++; } else { failed++; console.log(`FAILED ${name} ${detail === undefined ? "" : JSON.stringify(detail)}`); }
}

async function expectError(name, cls, status, fn) {
  try {
    await fn();
    check(name, false, "no error");
  } catch (e) {
    check(name, e instanceof cls && e.status === status && typeof e.message === "string",
          { cls: e.constructor.name, status: e.status, message: e.message });
  }
}

async function main() {
  const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey, maxRetries: 0 });

  const models = [];
  for await (const m of client.models.list()) models.push(m);
  const ids = models.map((m) => m.id);
  check("models.list", ids.includes("base-llama") && ids.includes("qv"), ids);

  for (const model of ["base-llama", "qv"]) {
    const c = await client.completions.create({ model, prompt: "The quick brown fox", max_tokens: 10, temperature: 0 });
    check(`completions.${model}`, typeof c.choices[0].text === "string" && c.choices[0].finish_reason === "length" &&
          c.usage.completion_tokens === 10 && c.object === "text_completion", c);
    const stream = await client.completions.create({ model, prompt: "The quick brown fox", max_tokens: 10,
                                                     temperature: 0, stream: true });
    let text = "";
    for await (const chunk of stream) text += chunk.choices.map((x) => x.text).join("");
    check(`completions.${model}.stream_equals`, text === c.choices[0].text, [text, c.choices[0].text]);
  }
  const base = await client.completions.create({ model: "base-llama", prompt: "Adapters", max_tokens: 10, temperature: 0 });
  const lora = await client.completions.create({ model: "qv", prompt: "Adapters", max_tokens: 10, temperature: 0 });
  check("completions.adapter_changes_answer", base.choices[0].text !== lora.choices[0].text, [base.choices[0].text, lora.choices[0].text]);

  const messages = [{ role: "system", content: "Be brief." }, { role: "user", content: "Hello there" }];
  const chat = await client.chat.completions.create({ model: "qv", messages, max_tokens: 8, temperature: 0,
                                                      logprobs: true, top_logprobs: 2 });
  const msg = chat.choices[0].message;
  check("chat.message", msg.role === "assistant" && typeof msg.content === "string" && chat.object === "chat.completion", chat);
  check("chat.logprobs", chat.choices[0].logprobs.content.length === 8 &&
        chat.choices[0].logprobs.content.every((t) => t.top_logprobs.length === 2 && Array.isArray(t.bytes)));
  const cstream = await client.chat.completions.create({ model: "qv", messages, max_tokens: 8, temperature: 0, stream: true,
                                                         stream_options: { include_usage: true } });
  let ctext = "", usage = null, finish = null;
  for await (const chunk of cstream) {
    for (const ch of chunk.choices) {
      ctext += ch.delta.content || "";
      if (ch.finish_reason) finish = ch.finish_reason;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  check("chat.stream_equals", ctext === msg.content, [ctext, msg.content]);
  check("chat.stream_usage", usage && usage.completion_tokens === 8 && finish === "length", usage);

  const n = await client.chat.completions.create({ model: "base-llama", messages, max_tokens: 6, temperature: 0.9,
                                                   seed: 7, n: 2 });
  const again = await client.chat.completions.create({ model: "base-llama", messages, max_tokens: 6, temperature: 0.9,
                                                       seed: 7, n: 2 });
  check("chat.n2_seeded", n.choices.length === 2 && n.choices[1].index === 1 &&
        n.choices.map((c) => c.message.content).join("|") === again.choices.map((c) => c.message.content).join("|"));

  const full = chat.choices[0].message.content;
  if (full.length > 6) {
    const stop = full.slice(3, 6);
    const stopped = await client.chat.completions.create({ model: "qv", messages, max_tokens: 8, temperature: 0, stop: [stop] });
    check("chat.stop", stopped.choices[0].message.content === full.slice(0, full.indexOf(stop)) &&
          stopped.choices[0].finish_reason === "stop", stopped.choices[0]);
  }

  await expectError("error.401", OpenAI.AuthenticationError, 401, () =>
    new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "wrong", maxRetries: 0 })
      .completions.create({ model: "qv", prompt: "x" }));
  await expectError("error.404", OpenAI.NotFoundError, 404, () =>
    client.completions.create({ model: "no-such-adapter", prompt: "x" }));
  await expectError("error.400_value", OpenAI.BadRequestError, 400, () =>
    client.completions.create({ model: "qv", prompt: "x", temperature: -3 }));
  await expectError("error.400_tools", OpenAI.BadRequestError, 400, () =>
    client.chat.completions.create({ model: "qv", messages, tools: [{ type: "function", function: { name: "f" } }] }));
  await expectError("error.400_too_long", OpenAI.BadRequestError, 400, () =>
    client.completions.create({ model: "qv", prompt: "x", max_tokens: 1000000 }));

  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main().catch((e) => { console.log("FAILED", e); process.exit(1); });
