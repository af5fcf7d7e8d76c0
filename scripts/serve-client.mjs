// scripts/serve-client.mjs — what the benchmark clients of `modpipe serve` share
// (scripts/bench-serve.mjs, scripts/bench-kv.mjs): Node 20, no packages.
//
//   xorshift(seed)  a reproducible generator (xorshift64*): () => a double in [0, 1)
//   now()           seconds, monotonic
//   stream(url, body, { headers, signal, onTokens })
//                   POST url/v1/completions?return_token_ids=1 with the JSON body (stream:
//                   true) and read the SSE stream by hand; onTokens(t, ids) for every event
//                   carrying token ids (t: when its chunk arrived; one event may carry several
//                   ids). Returns { ok: true, t0 } (t0: when the request was sent), or
//                   { ok: false, t0, status?, error } for a refused request, a transport
//                   error or an error event. An abort through signal ends it with ok: true.
//   pct(xs, p)      the p-th percentile (linear between ranks) of the finite values; NaN if none

export function xorshift(seed) {
  let st = BigInt(seed || 1) | 1n;
  return () => {
    st ^= st >> 12n; st ^= (st << 25n) & 0xffffffffffffffffn; st ^= st >> 27n;
    return Number(((st * 2685821657736338717n) & 0xffffffffffffffffn) >> 11n) / 2 ** 53;
  };
}

export const now = () => Number(process.hrtime.bigint()) / 1e9;

export async function stream(url, body, { headers = {}, signal, onTokens }) {
  const t0 = now();
  let res;
  try {
    res = await fetch(`${url}/v1/completions?return_token_ids=1`, {
      method: "POST", headers: { "Content-Type": "application/json", ...headers },
      body: JSON.stringify(body), signal });
  } catch (e) { return { ok: false, t0, error: String(e) }; }
  if (res.status !== 200) return { ok: false, t0, status: res.status, error: await res.text() };
  const dec = new TextDecoder();
  let buf = "";
  try {
    for await (const chunk of res.body) {
      const t = now();
      buf += dec.decode(chunk, { stream: true });
      let k;
      while ((k = buf.indexOf("\n\n")) >= 0) {
        const ev = buf.slice(0, k);
        buf = buf.slice(k + 2);
        if (!ev.startsWith("data: ") || ev === "data: [DONE]") continue;
        const j = JSON.parse(ev.slice(6));
        if (j.error) return { ok: false, t0, error: JSON.stringify(j.error) };
        const c = j.choices && j.choices[0];
        if (c && c.token_ids && c.token_ids.length) onTokens(t, c.token_ids);
      }
    }
  } catch (e) { if (!signal || !signal.aborted) return { ok: false, t0, error: String(e) }; }
  return { ok: true, t0 };
}

export function pct(xs, p) {
  const a = xs.filter(x => Number.isFinite(x)).sort((x, y) => x - y);
  if (!a.length) return NaN;
  const r = (p / 100) * (a.length - 1), lo = Math.floor(r), hi = Math.ceil(r);
  return a[lo] + (a[hi] - a[lo]) * (r - lo);
}
