// scripts/bench-serve.mjs — the load generator of scripts/bench-serve (vLLM's serving
// benchmark method), Node 20, no packages (fetch + the SSE stream by hand).
//
//   node scripts/bench-serve.mjs --url http://127.0.0.1:PORT --csv OUT.csv --tag "k=v,..."
//        [--concurrency 1,4,16,64 | --rate R] [--requests N] [--prompt-len P] [--output-len O]
//        [--seed S] [--prompts-file F]
//
// Every request: a random id prompt of P tokens (seeded; --prompts-file: the file's lines of
// comma-separated ids in turn, request i gets line i mod lines — the sequences the generate
// baseline runs), max_tokens O, ignore_eos (fixed
// output length), greedy, stream with include_usage and ?return_token_ids=1 (so tokens are
// counted exactly even when one SSE event carries several). Per level (one concurrency, or
// the Poisson rate with unbounded concurrency) it sends N requests and measures
//   TTFT  first token - request sent              (per request)
//   TPOT  (last token - first token) / (tokens-1) (per request)
//   ITL   time between consecutive SSE token events, each event's gap spread over its tokens
//   output tok/s = all output tokens / (last response end - first request sent)
//   steady tok/s  the output tokens that arrived while the level ran at full concurrency C,
//                 over that window: from the moment C requests have had their first token to
//                 the (N-C+1)-th response end (after it fewer than C streams are left), so
//                 the ramp-up and the tail are left out; empty when the window is empty
//                 (N <= C). bench-serve compares it at C = 16 with generate's steady rate.
// p50 / p99 / mean of each, and the bytes the pipeline links sent (with what a dense pipeline
// would have) during the level, from /metrics. One CSV row per level: the tag's values first.
import { appendFileSync, existsSync, readFileSync, writeFileSync } from "node:fs";
import { now, pct, stream, xorshift } from "./serve-client.mjs";

const args = Object.fromEntries((() => {
  const a = process.argv.slice(2), out = [];
  for (let i = 0; i < a.length; i++) {
    if (!a[i].startsWith("--")) throw new Error(`unexpected argument ${a[i]}`);
    out.push([a[i].slice(2), a[i + 1]]);
    i++;
  }
  return out;
})());
const url = args.url;
if (!url || !args.csv) { console.error("bench-serve.mjs: --url and --csv are required"); process.exit(2); }
const nreq = +(args.requests || 64), plen = +(args["prompt-len"] || 32), olen = +(args["output-len"] || 64);
const levels = args.rate ? [{ mode: "rate", value: +args.rate }]
  : (args.concurrency || "1,4,16,64").split(",").map(v => ({ mode: "concurrency", value: +v }));
const tag = (args.tag || "").split(",").filter(Boolean).map(kv => kv.split("="));

const rnd = xorshift(args.seed); // reproducible prompts and arrival times

async function metrics() {
  const t = await (await fetch(`${url}/metrics`, { headers: auth() })).text();
  let bytes = 0, dense = 0, gen = 0;
  const c = {}; // the scheduler's micro-batch counters
  for (const line of t.split("\n")) {
    const k = line.match(/^modpipe_(micro_batches|decode_micro_batches|decode_rows|decode_in_flight)_total (\d+)/);
    if (k) c[k[1]] = +k[2];
    const m = line.match(/^(modpipe_link_bytes_total|modpipe_link_dense_bytes_total|modpipe_generated_tokens_total)(\{[^}]*\})? (\d+)/);
    if (!m) continue;
    if (m[1] === "modpipe_link_bytes_total") bytes += +m[3];
    else if (m[1] === "modpipe_link_dense_bytes_total") dense += +m[3];
    else gen += +m[3];
  }
  return { bytes, dense, gen, c };
}
const auth = () => (process.env.MODPIPE_API_KEY ? { Authorization: `Bearer ${process.env.MODPIPE_API_KEY}` } : {});

async function vocab() {
  const m = await (await fetch(`${url}/v1/models`, { headers: auth() })).json();
  return m.data[0].meta?.n_vocab || 256;
}

async function one(prompt) {
  let ntok = 0, tfirst = 0, tlast = 0;
  const itl = [], ev = []; // ev: [time, tokens] of every SSE token event
  const r = await stream(url, { model: "m", prompt, max_tokens: olen, ignore_eos: true, temperature: 0,
                                stream: true, stream_options: { include_usage: true } },
                         { headers: auth(), onTokens: (t, ids) => {
                           const n = ids.length;
                           if (!ntok) tfirst = t;
                           else for (let i = 0; i < n; i++) itl.push((t - tlast) / n);
                           ntok += n;
                           tlast = t;
                           ev.push([t, n]);
                         } });
  if (!r.ok) return { ok: false, status: r.status, t0: r.t0, t1: now() };
  return { ok: true, t0: r.t0, t1: now(), ntok, tfirst, ev, ttft: tfirst - r.t0,
           tpot: ntok > 1 ? (tlast - tfirst) / (ntok - 1) : NaN, itl };
}

const mean = xs => xs.length ? xs.reduce((s, x) => s + x, 0) / xs.length : NaN;
const ms = x => (1000 * x).toFixed(3);

// the scheduler during the level: micro-batches, decode rows per decode micro-batch, and the
// decode pipeline depth (decode micro-batches in flight when one is issued, itself included)
function depth(a, b) {
  const d = k => (b[k] ?? 0) - (a[k] ?? 0), n = d("decode_micro_batches");
  return { micro_batches: d("micro_batches"), decode_rows_per_mb: n ? (d("decode_rows") / n).toFixed(2) : "",
           decode_depth: n ? (d("decode_in_flight") / n).toFixed(2) : "" };
}

// output tok/s while c streams ran (the window in the header); "" when it is empty
function steady(ok, c) {
  const n = ok.length;
  if (n <= c) return "";
  const first = ok.map(r => r.tfirst).sort((a, b) => a - b), end = ok.map(r => r.t1).sort((a, b) => a - b);
  const ta = first[c - 1], tb = end[n - c];
  if (!(tb > ta)) return "";
  let toks = 0;
  for (const r of ok) for (const [t, k] of r.ev) if (t >= ta && t <= tb) toks += k;
  return (toks / (tb - ta)).toFixed(2);
}

async function level(lv, prompts) {
  const m0 = await metrics();
  const t0 = now();
  const results = [];
  if (lv.mode === "concurrency") {
    let next = 0;
    await Promise.all(Array.from({ length: Math.min(lv.value, prompts.length) }, async () => {
      while (next < prompts.length) results.push(await one(prompts[next++]));
    }));
  } else {
    const pend = [];
    for (let i = 0; i < prompts.length; i++) {
      pend.push(one(prompts[i]).then(r => results.push(r)));
      const gap = -Math.log(1 - rnd()) / lv.value; // exponential inter-arrival: a Poisson process
      await new Promise(r => setTimeout(r, gap * 1000));
    }
    await Promise.all(pend);
  }
  const t1 = Math.max(...results.map(r => r.t1));
  const m1 = await metrics();
  const ok = results.filter(r => r.ok && r.ntok > 0);
  const toks = ok.reduce((s, r) => s + r.ntok, 0);
  const ttft = ok.map(r => r.ttft), tpot = ok.map(r => r.tpot), itl = ok.flatMap(r => r.itl);
  return {
    mode: lv.mode, level: lv.value, requests: prompts.length, failed: results.length - ok.length,
    duration_s: (t1 - t0).toFixed(3), output_tok_s: (toks / (t1 - t0)).toFixed(2),
    steady_tok_s: lv.mode === "concurrency" ? steady(ok, Math.min(lv.value, ok.length)) : "",
    req_s: (ok.length / (t1 - t0)).toFixed(3),
    ttft_mean_ms: ms(mean(ttft)), ttft_p50_ms: ms(pct(ttft, 50)), ttft_p99_ms: ms(pct(ttft, 99)),
    tpot_mean_ms: ms(mean(tpot)), tpot_p50_ms: ms(pct(tpot, 50)), tpot_p99_ms: ms(pct(tpot, 99)),
    itl_mean_ms: ms(mean(itl)), itl_p50_ms: ms(pct(itl, 50)), itl_p99_ms: ms(pct(itl, 99)),
    output_tokens: toks, wire_bytes: m1.bytes - m0.bytes, dense_bytes: m1.dense - m0.dense,
    wire_vs_dense: m1.dense > m0.dense ? ((m1.bytes - m0.bytes) / (m1.dense - m0.dense)).toFixed(4) : "",
    ...depth(m0.c, m1.c),
  };
}

for (let i = 0; ; i++) { // the server may still be loading
  try { if ((await fetch(`${url}/health`)).status === 200) break; } catch { /* not listening yet */ }
  if (i > 600) { console.error("bench-serve.mjs: the server never became ready"); process.exit(1); }
  await new Promise(r => setTimeout(r, 100));
}
const V = await vocab();
const fileprompts = args["prompts-file"]
  ? readFileSync(args["prompts-file"], "utf8").trim().split("\n").map(l => l.split(",").map(Number))
  : null;
const mkprompts = () => fileprompts
  ? Array.from({ length: nreq }, (_, i) => fileprompts[i % fileprompts.length])
  : Array.from({ length: nreq }, () => Array.from({ length: plen }, () => 3 + Math.floor(rnd() * (V - 3))));
await one(mkprompts()[0]); // warm-up: first-touch of the weights and caches
for (const lv of levels) {
  const row = await level(lv, mkprompts());
  const cols = [...tag.map(([k]) => k), ...Object.keys(row)];
  if (!existsSync(args.csv)) writeFileSync(args.csv, cols.join(",") + "\n");
  appendFileSync(args.csv, [...tag.map(([, v]) => v), ...Object.values(row)].join(",") + "\n");
  console.error(`bench-serve: ${tag.map(([k, v]) => `${k}=${v}`).join(" ")} ${lv.mode} ${lv.value}: ` +
                `${row.output_tok_s} tok/s (steady ${row.steady_tok_s || "-"}), TTFT p50 ${row.ttft_p50_ms} ms p99 ${row.ttft_p99_ms} ms, ` +
                `TPOT p50 ${row.tpot_p50_ms} ms, ITL p50 ${row.itl_p50_ms} p99 ${row.itl_p99_ms} ms, ` +
                `decode ${row.decode_rows_per_mb} rows/mb at depth ${row.decode_depth}` +
                (row.failed ? `, ${row.failed} FAILED` : ""));
  if (row.failed) process.exitCode = 1;
}
