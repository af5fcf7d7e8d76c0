// scripts/bench-kv.mjs — the client of scripts/bench-kv (docs/SPEC.md §11 measured): Node 20,
// no packages. One mode per call against a running `modpipe serve`, one JSON line on stdout.
//
//   node scripts/bench-kv.mjs MODE --url URL [--n N] [--prompt-len P] [--output-len O]
//        [--prefix-len L] [--seed S]
//   probe     one stream of P + O tokens; KV pages it held at its peak (modpipe_kv_pages_peak)
//   burst     N such streams at once; most requests running at once (modpipe_requests_running,
//             polled every 20 ms), preemptions during the burst, requests that failed
//   ttft      a holder request (prefix of L ids, long output) keeps running while N requests
//             (same prefix + P-L own ids, 1 output token) are sent one after another; their
//             TTFT p50 / mean, prefix cache hits; then the holder is cancelled
//   seq       N requests (same prefix of L ids + P-L own ids, 1 output token) one after another
//             with nothing else running: the first computes the prefix, the later ones can only
//             find it in the cache of finished prefixes; TTFT of the first and p50 of the rest
//   overload  N streams at once (preemptions expected), then each again alone; outputs compared;
//             0.6 s after the last one the pools: pages used (running) / cached (prefix holders)
//             / free, and the holders in use
// Prompts are seeded pseudo-random ids (< 500, every tokenizer here has them); greedy, ignore_eos.
import { now, pct, stream, xorshift } from "./serve-client.mjs";

const argv = process.argv.slice(2);
const mode = argv.shift();
const args = {};
for (let i = 0; i < argv.length; i += 2) {
  if (!argv[i].startsWith("--") || argv[i + 1] === undefined) {
    console.error(`bench-kv.mjs: bad argument '${argv[i]}'`);
    process.exit(2);
  }
  args[argv[i].slice(2)] = argv[i + 1];
}
const url = args.url;
if (!url || !["probe", "burst", "ttft", "seq", "overload"].includes(mode)) {
  console.error("bench-kv.mjs: usage: MODE(probe|burst|ttft|seq|overload) --url URL [...]");
  process.exit(2);
}
const N = +(args.n || 1), P = +(args["prompt-len"] || 1008), O = +(args["output-len"] || 16);
const L = +(args["prefix-len"] || 512);
const rnd = xorshift(args.seed);
const ids = n => Array.from({ length: n }, () => 3 + Math.floor(rnd() * 497));

async function metrics() {
  const t = await (await fetch(`${url}/metrics`)).text();
  const m = { stage: {} };
  for (const line of t.split("\n")) {
    const r = line.match(/^(modpipe_[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$/);
    if (!r) continue;
    m[r[1]] = (m[r[1]] || 0) + +r[3]; // summed over stages
    const sg = r[2] && r[2].match(/^\{stage="(\d+)"\}$/);
    if (sg) (m.stage[r[1]] ||= [])[+sg[1]] = +r[3];
  }
  return m;
}

// one streaming completion: token ids and TTFT; signal aborts it (the holder)
async function one(prompt, olen, signal) {
  const toks = [];
  let tfirst = 0;
  const r = await stream(url, { model: "m", prompt, max_tokens: olen, ignore_eos: true,
                                temperature: 0, stream: true },
                         { signal, onTokens: (t, ids) => { if (!toks.length) tfirst = t; toks.push(...ids); } });
  return r.ok ? { ok: true, toks, ttft: tfirst - r.t0 } : r;
}

const out = o => console.log(JSON.stringify(o));

async function burst(prompts, olen) {
  const m0 = await metrics();
  let maxrun = 0, done = false;
  const poll = (async () => {
    while (!done) {
      const m = await metrics();
      maxrun = Math.max(maxrun, m.modpipe_requests_running || 0);
      await new Promise(r => setTimeout(r, 20));
    }
  })();
  const t0 = now();
  const rs = await Promise.all(prompts.map(p => one(p, olen)));
  const secs = now() - t0;
  done = true;
  await poll;
  await new Promise(r => setTimeout(r, 600)); // every stage's pool report (every 0.25 s)
  const m1 = await metrics();
  return { rs, maxrun, secs, preemptions: m1.modpipe_preemptions_total - m0.modpipe_preemptions_total,
           peak: m1.modpipe_kv_pages_peak, total: m1.modpipe_kv_pages_total,
           used_after: m1.modpipe_kv_pages_used, page_bytes: m1.modpipe_kv_page_bytes,
           // streams the fullest stage holds at this peak: min over stages of total / peak
           fit: Math.min(...(m1.stage.modpipe_kv_pages_total || [0]).map(
             (t, s) => Math.floor(t / Math.max(1, (m1.stage.modpipe_kv_pages_peak || [])[s] || 0)))),
           stage_peak: m1.stage.modpipe_kv_pages_peak, stage_total: m1.stage.modpipe_kv_pages_total };
}

if (mode === "probe" || mode === "burst") {
  const prompts = Array.from({ length: mode === "probe" ? 1 : N }, () => ids(P));
  const b = await burst(prompts, O);
  const failed = b.rs.filter(r => !r.ok);
  out({ mode, n: prompts.length, tokens: P + O, max_running: b.maxrun, preemptions: b.preemptions,
        failed: failed.length, first_error: failed[0]?.error, pages_peak: b.peak,
        pages_total: b.total, page_bytes: b.page_bytes, stage_peak: b.stage_peak,
        stage_total: b.stage_total, fit: b.fit,
        seconds: +b.secs.toFixed(2) });
} else if (mode === "ttft") {
  const prefix = ids(L);
  const ac = new AbortController();
  const m0 = await metrics();
  const holder = one([...prefix, ...ids(16)], +(args["holder-len"] || 400), ac.signal);
  // wait until the holder runs and has its prompt computed (it produced a token)
  for (let i = 0; i < 3000; i++) {
    const m = await metrics();
    if ((m.modpipe_generated_tokens_total || 0) > (m0.modpipe_generated_tokens_total || 0)) break;
    await new Promise(r => setTimeout(r, 10));
  }
  const ttfts = [], fails = [];
  for (let i = 0; i < N; i++) {
    const r = await one([...prefix, ...ids(P - L)], 1);
    if (r.ok) ttfts.push(r.ttft); else fails.push(r.error);
  }
  const m1 = await metrics();
  ac.abort();
  await holder;
  out({ mode, n: N, prefix: L, prompt: P, ttft_p50_ms: +(1000 * pct(ttfts, 50)).toFixed(1),
        ttft_mean_ms: +(1000 * ttfts.reduce((s, x) => s + x, 0) / ttfts.length).toFixed(1),
        prefix_hits: m1.modpipe_prefix_cache_hits_total - m0.modpipe_prefix_cache_hits_total,
        prefix_tokens: m1.modpipe_prefix_cache_tokens_total - m0.modpipe_prefix_cache_tokens_total,
        failed: fails.length, first_error: fails[0] });
} else if (mode === "seq") {
  const prefix = ids(L);
  const m0 = await metrics();
  const ttfts = [], fails = [];
  for (let i = 0; i < N; i++) {
    const r = await one([...prefix, ...ids(P - L)], 1);
    if (r.ok) ttfts.push(r.ttft); else fails.push(r.error);
  }
  await new Promise(r => setTimeout(r, 600)); // the stages' pool reports (every 0.25 s)
  const m1 = await metrics();
  const d = k => (m1[k] || 0) - (m0[k] || 0);
  out({ mode, n: N, prefix: L, prompt: P, ttft_first_ms: +(1000 * (ttfts[0] || 0)).toFixed(1),
        ttft_rest_p50_ms: +(1000 * pct(ttfts.slice(1), 50)).toFixed(1),
        parked_hits: d("modpipe_prefix_cache_parked_hits_total"),
        prefix_tokens: d("modpipe_prefix_cache_tokens_total"),
        pages_cached: m1.modpipe_kv_pages_cached || 0, failed: fails.length,
        first_error: fails[0] });
} else {
  const prompts = Array.from({ length: N }, () => ids(P));
  const b = await burst(prompts, O);
  let same = 0, lost = 0;
  for (let i = 0; i < N; i++) {
    const a = await one(prompts[i], O);
    if (!b.rs[i].ok || !a.ok) { lost++; continue; }
    if (JSON.stringify(a.toks) === JSON.stringify(b.rs[i].toks) && a.toks.length === O) same++;
  }
  // the pools once every stage has reported after the last request ended (a stage reports at
  // most every 0.25 s, engine/pipeline.c, and rank 0 hands reports on at most every 0.25 s):
  // pages of running sequences (0: none leaked), of the prefix holders (finished requests'
  // prefixes kept for reuse), free
  await new Promise(r => setTimeout(r, 600));
  const m = await metrics();
  out({ mode, n: N, tokens: P + O, max_running: b.maxrun, preemptions: b.preemptions, lost,
        identical: same, pages_after: { used: m.modpipe_kv_pages_used,
                                        cached: m.modpipe_kv_pages_cached,
                                        free: m.modpipe_kv_pages_free,
                                        total: m.modpipe_kv_pages_total,
                                        holders: m.modpipe_prefix_holders_used,
                                        stage_used: m.stage.modpipe_kv_pages_used,
                                        stage_cached: m.stage.modpipe_kv_pages_cached },
        seconds: +b.secs.toFixed(2) });
}
