// tests/serve/streams.mjs BASE OUT [N] [MAX_TOKENS]: N greedy and N sampled (seeded) streams
// at once against BASE (http://host:port), each `stream: true` with ?return_token_ids=1 so
// every token arrives as one event with its id. Writes OUT: one entry per request,
// {ids: [...], done: bool, error: string|null}; prints how many completed and the longest
// pause between two events of a stream. Used by tests/serve/recover.sh to compare a
// run with a killed / stopped rank against an uninterrupted one. Node only, no packages.
import { writeFileSync } from "node:fs";

const [base, out, nArg, maxArg] = process.argv.slice(2);
const N = Number(nArg || 8), MAX = Number(maxArg || 300);
const PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom", "One day", "The sun was",
                 "She wanted to", "Mom said", "In the park"];

let pause = 0; // the longest gap between two events of a stream (ms)

async function one(i) {
  const sampled = i >= N;
  const body = {
    prompt: PROMPTS[i % PROMPTS.length], max_tokens: MAX, ignore_eos: true, stream: true,
    temperature: sampled ? 0.9 : 0, top_p: sampled ? 0.95 : 1, seed: 1000 + i,
  };
  const r = { ids: [], done: false, error: null };
  let last = 0;
  try {
    const res = await fetch(`${base}/v1/completions?return_token_ids=1`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (res.status !== 200) {
      r.error = `HTTP ${res.status}: ${await res.text()}`;
      return r;
    }
    const dec = new TextDecoder();
    let buf = "";
    for await (const chunk of res.body) {
      buf += dec.decode(chunk, { stream: true });
      let k;
      while ((k = buf.indexOf("\n\n")) >= 0) {
        const ev = buf.slice(0, k);
        buf = buf.slice(k + 2);
        if (!ev.startsWith("data: ")) continue;
        const d = ev.slice(6);
        if (d === "[DONE]") { r.done = true; continue; }
        const j = JSON.parse(d);
        if (j.error) { r.error = j.error.message; continue; }
        for (const c of j.choices || []) for (const t of c.token_ids || []) r.ids.push(t);
        const t = performance.now();
        if (last && t - last > pause) pause = t - last;
        last = t;
      }
    }
  } catch (e) {
    r.error = String(e);
  }
  return r;
}

const all = await Promise.all(Array.from({ length: 2 * N }, (_, i) => one(i)));
writeFileSync(out, JSON.stringify(all));
const ok = all.filter(r => r.done && !r.error).length;
console.log(`${ok} of ${all.length} streams complete; longest pause ${pause.toFixed(0)} ms`);
