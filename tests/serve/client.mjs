// tests/serve/client.mjs — drives `modpipe serve` with the official OpenAI Node client.
//   node client.mjs BASE_URL API_KEY EXPECTED.json
// EXPECTED.json: [{"prompt": [ids], "tokens": [ids]}, ...] from `modpipe generate` (greedy).
// Checks: N concurrent greedy streams give generate's tokens (token_ids extension) and their
// text equals the non-streaming text; chat (stream and not); models.list; a 400 through the
// client names the field. Prints one line per check and "N passed, N failed"; exit 1 on any
// failure.
import OpenAI from "openai";
import { readFileSync } from "node:fs";

const [base, key, expectedPath] = process.argv.slice(2);
const expected = JSON.parse(readFileSync(expectedPath, "utf8"));
const client = new OpenAI({ baseURL: base, apiKey: key || "none", maxRetries: 0, timeout: 120000 });
let passed = 0, failed = 0;
function check(ok, what, detail) {
  if (ok) passed++; else failed++;
  console.log(`${ok ? "ok  " : "FAIL"} ${what}${ok || !detail ? "" : ": " + detail}`);
}
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

// 1. concurrent greedy streams vs generate
async function stream(e) {
  const s = await client.completions.create(
    { model: "m", prompt: e.prompt, max_tokens: e.max_tokens, temperature: 0, stream: true,
      stream_options: { include_usage: true } },
    { query: { return_token_ids: 1 } });
  let text = "", ids = [], finish = null, usage = null;
  for await (const c of s) {
    if (c.usage) usage = c.usage;
    for (const ch of c.choices) {
      text += ch.text;
      if (ch.token_ids) ids.push(...ch.token_ids);
      if (ch.finish_reason) finish = ch.finish_reason;
    }
  }
  return { text, ids, finish, usage };
}
const results = await Promise.all(expected.map(stream));
let bad = results.map((r, i) => same(r.ids, expected[i].tokens) ? -1 : i).filter(i => i >= 0);
check(bad.length === 0, `${expected.length} concurrent greedy streams == generate's tokens`,
      bad.length ? `stream ${bad[0]}: got ${results[bad[0]].ids} want ${expected[bad[0]].tokens}` : "");
check(results.every((r, i) => r.usage && r.usage.completion_tokens === expected[i].tokens.length &&
                               r.usage.prompt_tokens === expected[i].prompt.length),
      "usage of every stream (include_usage)");
check(results.every((r, i) => r.finish === (expected[i].tokens.length < expected[i].max_tokens ? "stop" : "length")),
      "finish_reason stop at EOS, length at max_tokens");

// 2. the same prompts, not streaming: same tokens and text
const plain = await Promise.all(expected.slice(0, 8).map(e =>
  client.completions.create({ model: "m", prompt: e.prompt, max_tokens: e.max_tokens, temperature: 0 })));
bad = plain.map((r, i) => same(r.choices[0].token_ids, expected[i].tokens) && r.choices[0].text === results[i].text ? -1 : i)
  .filter(i => i >= 0);
check(bad.length === 0, "non-streaming completions: same tokens and text as the streams",
      bad.length ? JSON.stringify(plain[bad[0]].choices[0]) + " vs " + JSON.stringify(results[bad[0]].text) : "");
check(plain[0].object === "text_completion" && plain[0].usage.total_tokens ===
      plain[0].usage.prompt_tokens + plain[0].usage.completion_tokens, "completion object and usage");

// 3. text prompt + stop string: nothing of the stop string, finish stop
const t = await client.completions.create({ model: "m", prompt: "Once upon a time", max_tokens: 40, temperature: 0 });
const full = t.choices[0].text;
const cut = full.indexOf(" girl");
if (cut > 0) {
  const st = await client.completions.create({ model: "m", prompt: "Once upon a time", max_tokens: 40,
                                               temperature: 0, stop: [" girl"], stream: true });
  let txt = "", fin = null;
  for await (const c of st) for (const ch of c.choices) { txt += ch.text; if (ch.finish_reason) fin = ch.finish_reason; }
  check(txt === full.slice(0, cut) && fin === "stop", "streamed stop string held back and cut",
        JSON.stringify({ txt, fin, want: full.slice(0, cut) }));
} else {
  check(false, "reference text contains ' girl' (for the stop test)", JSON.stringify(full));
}

// 4. chat, streaming and not
const msgs = [{ role: "user", content: "Once upon a time" }];
const cc = await client.chat.completions.create({ model: "m", messages: msgs, max_tokens: 20, temperature: 0 });
check(cc.object === "chat.completion" && cc.choices[0].message.role === "assistant" &&
      cc.choices[0].message.content.length > 0, "chat completion", JSON.stringify(cc));
const cs = await client.chat.completions.create({ model: "m", messages: msgs, max_tokens: 20, temperature: 0, stream: true });
let ctext = "", role = null;
for await (const c of cs) for (const ch of c.choices) { if (ch.delta.role) role = ch.delta.role; ctext += ch.delta.content || ""; }
check(role === "assistant" && ctext === cc.choices[0].message.content, "chat stream == chat completion",
      JSON.stringify({ role, ctext }));

// 5. models and a 400 through the client
const models = await client.models.list();
check(models.data.length === 1 && models.data[0].object === "model", "models.list");
try {
  await client.completions.create({ model: "m", prompt: "x", temperature: 5 });
  check(false, "temperature 5 is refused");
} catch (e) {
  check(e.status === 400 && e.error && e.error.param === "temperature", "400 names the field through the client",
        `${e.status} ${JSON.stringify(e.error)}`);
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
