/* train/train_impl.h — the training forward / backward, written once for a real type.
 * Included by train/train.c with R = float (RN(x) = x##_f, cblas_sgemm) and R = double
 * (RN(x) = x##_d, cblas_dgemm). No include guard on purpose. See train.h for the math. */

/* Weights of one precision (float: pointers into the st_model; double: owned copies). */
typedef struct {
    const R *ln1, *ln2; /* [D] */
    const R *wq;        /* [qd][D] */
    const R *wk, *wv;   /* [kvd][D] */
    const R *wo;        /* [D][qd] */
    const R *wg, *wu;   /* [FF][D] */
    const R *wd;        /* [D][FF] */
    /* docs/SPEC.md §10, NULL when absent: biases (constants: only the forward changes) */
    const R *bq, *bk, *bv; /* [qd], [kvd], [kvd] */
    const R *bo;           /* [D] */
    const R *bg, *bu;      /* [FF] */
    const R *bd;           /* [D] */
    const R *qn, *kn;      /* [hd] per-head RMSNorm of q and k before RoPE */
} RN(lw);

typedef struct {
    RN(lw) * L;     /* [n_layers] */
    const R *embed; /* [V][D] */
    const R *norm;  /* [D] */
    const R *lm;    /* [V][D] */
} RN(wts);

/* Activations of one precision. Slot li = layer - first (first = first routed layer); layers
 * before `first` run in slot 0 and are overwritten (they get no gradient). N = max_seqs * T. */
typedef struct {
    R *x;          /* [nl][N][D] layer input */
    R *h;          /* [nl][N][D] rmsnorm(x, ln1) */
    R *r1, *r2;    /* [nl][N] 1/rms of x and x2 */
    R *q;          /* [nl][N][qd] roped */
    R *k;          /* [nl][N][kvd] roped */
    R *v;          /* [nl][N][kvd] */
    R *att;        /* [nl][N][qd] attention before o_proj */
    R *a;          /* [nl][N][D] attention output */
    R *x2;         /* [nl][N][D] x + g a */
    R *f1, *f3;    /* [nl][N][FF] gate / up projections (pre-activation) */
    R *z, *sg, *g; /* [n_routed][N] router logit, sigmoid, gate (per row or per seq) */
    R *mean;       /* [n_routed][max_seqs][D] sequence granularity: mean_t h_t */
    R *res;        /* [N][D] running residual; after the forward: x_L */
    R *rf;         /* [N] 1/rms of x_L */
    R *dres;       /* [N][D] dLoss/d(layer output), running */
    R *h2;         /* [N][D] scratch: rmsnorm(x2) / dh2 */
    R *u;          /* [N][FF] scratch: silu(f1) f3 / du */
    R *df1, *df3;  /* [N][FF] */
    R *dx2;        /* [N][D] */
    R *dh;         /* [N][D] dh; da; dLoss/dhf in the head */
    R *datt;       /* [N][qd] */
    R *dq;         /* [N][qd] */
    R *dk, *dv;    /* [N][kvd] */
    R *dg;         /* [N] dLoss/dgate (per row or per seq) */
    R *logit;      /* [LCH][V] a chunk of logits / dlogits */
    R *e;          /* [T] attention weights of one query */
    R *qp, *kp;    /* [nl][N][qd], [nl][N][kvd] q, k before their norms (qk_norm, else [1]) */
    R *rq, *rk;    /* [nl][N*nh], [nl][N*nkv] their 1/rms per head */
    R *dqp, *dkp;  /* [N][qd], [N][kvd] */
    R *inv_freq;   /* [hd/2] */
} RN(acts);

static void RN(mm_nt)(const R *a, int m, int k, const R *b, int n, R *c, R beta)
{
    if (m <= 0 || n <= 0) return;
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, (R)1, a, k, b, k, beta, c, n);
}

static void RN(mm_nn)(const R *a, int m, int k, const R *b, int n, R *c, R beta)
{
    if (m <= 0 || n <= 0) return;
    GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, (R)1, a, k, b, n, beta, c, n);
}

static void RN(rmsnorm)(const R *x, int m, int d, const R *w, double eps, R *y, R *inv)
{
    for (int i = 0; i < m; i++) {
        const R *xi = x + (size_t)i * d;
        R *yi = y + (size_t)i * d;
        double ss = 0.0;
        for (int j = 0; j < d; j++) ss += (double)xi[j] * xi[j];
        R r = (R)(1.0 / sqrt(ss / d + eps));
        inv[i] = r;
        for (int j = 0; j < d; j++) yi[j] = xi[j] * r * w[j];
    }
}

/* dx += d rmsnorm(x, w)/dx ^T dy, row by row: y = x r w, r = (mean x^2 + eps)^-1/2. */
static void RN(rmsnorm_back)(const R *x, int m, int d, const R *w, const R *inv, const R *dy, R *dx)
{
    for (int i = 0; i < m; i++) {
        const R *xi = x + (size_t)i * d, *gi = dy + (size_t)i * d;
        R *di = dx + (size_t)i * d;
        double s = 0.0;
        for (int j = 0; j < d; j++) s += (double)gi[j] * w[j] * xi[j];
        double r = inv[i], c = r * r * r * s / d;
        for (int j = 0; j < d; j++) di[j] += (R)(r * gi[j] * w[j] - c * xi[j]);
    }
}

/* HF rotate_half rope of one row's heads v [nh][hd] at pos; dir = -1 applies the transpose
 * (the backward). */
static void RN(rope)(R *v, int nh, int hd, int pos, const R *inv_freq, int dir)
{
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        double ang = (double)pos * inv_freq[i];
        R c = (R)cos(ang), s = (R)(dir * sin(ang));
        for (int hh = 0; hh < nh; hh++) {
            R *p = v + (size_t)hh * hd;
            R a = p[i], b = p[i + half];
            p[i] = a * c - b * s;
            p[i + half] = b * c + a * s;
        }
    }
}

/* y [m][n] += b [n] (b NULL: nothing). */
static void RN(add_bias)(R *y, int m, int n, const R *b)
{
    if (!b) return;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) y[(size_t)i * n + j] += b[j];
}

static inline R RN(sigm)(R z) { return (R)1 / ((R)1 + EXPR(-z)); }

/* Causal attention of one sequence (rows base .. base+T-1): att = softmax(q k^T / sqrt(hd) +
 * log key weight) v, key j < i weighted by gk[j] (NULL: 1), a row's own key by 1; with a
 * window win > 0 only keys j > i - win. */
static void RN(attn_fwd)(const train_ws *ws, RN(acts) * A, const R *q, const R *k, const R *v,
                         const R *gk, R *att, int base, int win)
{
    const int T = ws->T, nh = ws->nh, nkv = ws->nkv, hd = ws->hd, qd = nh * hd, kvd = nkv * hd;
    const int grp = nh / nkv;
    const R rscale = (R)(1.0 / sqrt((double)hd));
    R *e = A->e;
    for (int i = 0; i < T; i++) {
        const size_t ni = (size_t)(base + i);
        const int j0 = win > 0 && i >= win ? i - win + 1 : 0; /* the window (docs/SPEC.md §10.4) */
        for (int hh = 0; hh < nh; hh++) {
            const R *qi = q + ni * qd + (size_t)hh * hd;
            const int kh = hh / grp;
            double mx = -INFINITY;
            for (int j = j0; j <= i; j++) {
                const R *kj = k + (size_t)(base + j) * kvd + (size_t)kh * hd;
                R d = 0;
                for (int c = 0; c < hd; c++) d += qi[c] * kj[c];
                d *= rscale;
                e[j] = d;
                if (d > mx) mx = d;
            }
            double Z = 0.0;
            const R mxr = (R)mx;
            for (int j = j0; j <= i; j++) {
                R wj = EXPR(e[j] - mxr) * ((gk && j < i) ? gk[base + j] : (R)1);
                e[j] = wj;
                Z += wj;
            }
            R *o = att + ni * qd + (size_t)hh * hd;
            for (int c = 0; c < hd; c++) o[c] = 0;
            const R rZ = (R)(1.0 / Z);
            for (int j = j0; j <= i; j++) {
                const R *vj = v + (size_t)(base + j) * kvd + (size_t)kh * hd;
                R p = e[j] * rZ;
                for (int c = 0; c < hd; c++) o[c] += p * vj[c];
            }
        }
    }
}

/* Backward of attn_fwd given datt: dq, dk, dv (+= for the sequence's rows, zeroed by the
 * caller) and, when gk, dgk[j] += dLoss/dgk_j. */
static void RN(attn_back)(const train_ws *ws, RN(acts) * A, const R *q, const R *k, const R *v,
                          const R *gk, const R *att, const R *datt, R *dq, R *dk, R *dv, R *dgk,
                          int base, int win)
{
    const int T = ws->T, nh = ws->nh, nkv = ws->nkv, hd = ws->hd, qd = nh * hd, kvd = nkv * hd;
    const int grp = nh / nkv;
    const R rscale = (R)(1.0 / sqrt((double)hd));
    R *e = A->e;
    for (int i = 0; i < T; i++) {
        const size_t ni = (size_t)(base + i);
        const int j0 = win > 0 && i >= win ? i - win + 1 : 0; /* the window (docs/SPEC.md §10.4) */
        for (int hh = 0; hh < nh; hh++) {
            const R *qi = q + ni * qd + (size_t)hh * hd;
            const R *oi = att + ni * qd + (size_t)hh * hd;
            const R *doi = datt + ni * qd + (size_t)hh * hd;
            R *dqi = dq + ni * qd + (size_t)hh * hd;
            const int kh = hh / grp;
            double mx = -INFINITY;
            for (int j = j0; j <= i; j++) {
                const R *kj = k + (size_t)(base + j) * kvd + (size_t)kh * hd;
                R d = 0;
                for (int c = 0; c < hd; c++) d += qi[c] * kj[c];
                d *= rscale;
                e[j] = d;
                if (d > mx) mx = d;
            }
            double Z = 0.0;
            const R mxr = (R)mx;
            for (int j = j0; j <= i; j++) {
                e[j] = EXPR(e[j] - mxr); /* unweighted */
                Z += (double)e[j] * ((gk && j < i) ? (double)gk[base + j] : 1.0);
            }
            R cdo = 0;
            for (int c = 0; c < hd; c++) cdo += doi[c] * oi[c];
            const R rZ = (R)(1.0 / Z);
            for (int j = j0; j <= i; j++) {
                const size_t nj = (size_t)(base + j);
                const R *kj = k + nj * kvd + (size_t)kh * hd;
                const R *vj = v + nj * kvd + (size_t)kh * hd;
                R *dkj = dk + nj * kvd + (size_t)kh * hd;
                R *dvj = dv + nj * kvd + (size_t)kh * hd;
                const R u = e[j] * rZ; /* dp / dweight */
                const R p = u * ((gk && j < i) ? gk[nj] : (R)1);
                R dp = 0;
                for (int c = 0; c < hd; c++) dp += doi[c] * vj[c];
                const R ds = p * (dp - cdo) * rscale;
                for (int c = 0; c < hd; c++) {
                    dqi[c] += ds * kj[c];
                    dkj[c] += ds * qi[c];
                    dvj[c] += p * doi[c];
                }
                if (gk && j < i) dgk[nj] += u * (dp - cdo);
            }
        }
    }
}

/* Map a routed-layer gate value: forward. */
static R RN(gate_of)(const train_ws *ws, R sg, const double *off)
{
    if (ws->setup.gate == TRAIN_GATE_STE) return (double)sg > ws->setup.threshold ? (R)1 : (R)0;
    return sg + (off ? (R)*off : (R)0);
}

static int RN(forward)(train_ws *ws, RN(acts) * A, const RN(wts) * W, const int32_t *tokens,
                       int n_seq, const double *rw, const double *rb, double inv_ntok,
                       const double *gate_offset)
{
    const int T = ws->T, D = ws->D, qd = ws->nh * ws->hd, kvd = ws->nkv * ws->hd, FF = ws->FF;
    const int V = ws->V, N = n_seq * T;
    const size_t NMAX = (size_t)ws->max_seqs * T;
    const int tok_gran = ws->setup.gran == STAGE_GRAN_TOKEN;
    const int ng = tok_gran ? N : n_seq;
    ws->n_seq = n_seq;
    ws->inv_ntok = inv_ntok;
    for (int n = 0; n < N; n++)
        memcpy(A->res + (size_t)n * D, W->embed + (size_t)tokens[n] * D, (size_t)D * sizeof(R));
    for (int ri = 0; ri < ws->setup.n_routed; ri++) ws->gate_sum[ri] = ws->sig_sum[ri] = 0.0;

    for (int l = 0; l < ws->n_layers; l++) {
        const RN(lw) *L = &W->L[l];
        const int li = l < ws->first ? 0 : l - ws->first, ri = ws->route_of[l];
        R *x = A->x + li * NMAX * D, *h = A->h + li * NMAX * D, *x2 = A->x2 + li * NMAX * D;
        R *q = A->q + li * NMAX * qd, *k = A->k + li * NMAX * kvd, *v = A->v + li * NMAX * kvd;
        R *att = A->att + li * NMAX * qd, *a = A->a + li * NMAX * D;
        R *f1 = A->f1 + li * NMAX * FF, *f3 = A->f3 + li * NMAX * FF;
        R *r1 = A->r1 + li * NMAX, *r2 = A->r2 + li * NMAX;
        memcpy(x, A->res, (size_t)N * D * sizeof(R));
        RN(rmsnorm)(x, N, D, L->ln1, ws->eps, h, r1);
        RN(mm_nt)(h, N, D, L->wq, qd, q, 0);
        RN(mm_nt)(h, N, D, L->wk, kvd, k, 0);
        RN(mm_nt)(h, N, D, L->wv, kvd, v, 0);
        RN(add_bias)(q, N, qd, L->bq);
        RN(add_bias)(k, N, kvd, L->bk);
        RN(add_bias)(v, N, kvd, L->bv);
        if (L->qn) { /* per-head norms before RoPE; the inputs kept for the backward */
            R *qp = A->qp + li * NMAX * qd, *kp = A->kp + li * NMAX * kvd;
            memcpy(qp, q, (size_t)N * qd * sizeof(R));
            memcpy(kp, k, (size_t)N * kvd * sizeof(R));
            RN(rmsnorm)(qp, N * ws->nh, ws->hd, L->qn, ws->eps, q, A->rq + li * NMAX * ws->nh);
            RN(rmsnorm)(kp, N * ws->nkv, ws->hd, L->kn, ws->eps, k, A->rk + li * NMAX * ws->nkv);
        }
        for (int n = 0; n < N; n++) {
            RN(rope)(q + (size_t)n * qd, ws->nh, ws->hd, n % T, A->inv_freq, 1);
            RN(rope)(k + (size_t)n * kvd, ws->nkv, ws->hd, n % T, A->inv_freq, 1);
        }
        R *g = NULL;
        if (ri >= 0) {
            R *z = A->z + (size_t)ri * NMAX, *sg = A->sg + (size_t)ri * NMAX;
            g = A->g + (size_t)ri * NMAX;
            const double *w = rw + (size_t)ri * D;
            for (int gi = 0; gi < ng; gi++) {
                double zz = rb[ri];
                if (tok_gran) {
                    const R *hn = h + (size_t)gi * D;
                    for (int c = 0; c < D; c++) zz += w[c] * hn[c];
                } else {
                    R *mn = A->mean + ((size_t)ri * ws->max_seqs + gi) * D;
                    for (int c = 0; c < D; c++) {
                        double s = 0.0;
                        for (int t = 0; t < T; t++) s += h[((size_t)gi * T + t) * D + c];
                        mn[c] = (R)(s / T);
                        zz += w[c] * mn[c];
                    }
                }
                z[gi] = (R)zz;
                sg[gi] = RN(sigm)((R)zz);
                g[gi] = RN(gate_of)(ws, sg[gi],
                                    gate_offset ? gate_offset + (size_t)ri * ng + gi : NULL);
                ws->gate_sum[ri] += g[gi];
                ws->sig_sum[ri] += sg[gi];
            }
        }
        const int win = stage_layer_window(&ws->m->cfg, l);
        for (int s = 0; s < n_seq; s++)
            RN(attn_fwd)(ws, A, q, k, v, tok_gran ? g : NULL, att, s * T, win);
        RN(mm_nt)(att, N, qd, L->wo, D, a, 0);
        RN(add_bias)(a, N, D, L->bo);
        for (int n = 0; n < N; n++) {
            R gs = g ? g[tok_gran ? n : n / T] : (R)1;
            const R *xn = x + (size_t)n * D, *an = a + (size_t)n * D;
            R *o = x2 + (size_t)n * D;
            for (int c = 0; c < D; c++) o[c] = xn[c] + gs * an[c];
        }
        RN(rmsnorm)(x2, N, D, L->ln2, ws->eps, A->h2, r2);
        RN(mm_nt)(A->h2, N, D, L->wg, FF, f1, 0);
        RN(mm_nt)(A->h2, N, D, L->wu, FF, f3, 0);
        RN(add_bias)(f1, N, FF, L->bg);
        RN(add_bias)(f3, N, FF, L->bu);
        for (size_t i = 0; i < (size_t)N * FF; i++) {
            R s = f1[i] * RN(sigm)(f1[i]);
            A->u[i] = s * f3[i];
        }
        memcpy(A->res, x2, (size_t)N * D * sizeof(R));
        RN(mm_nt)(A->u, N, FF, L->wd, D, A->res, 1);
        RN(add_bias)(A->res, N, D, L->bd);
    }

    /* head: loss and dLoss/dx_L in one pass over chunks of rows */
    RN(rmsnorm)(A->res, N, D, W->norm, ws->eps, A->dx2, A->rf); /* dx2: hf scratch */
    double nll = 0.0;
    memset(A->dres, 0, (size_t)N * D * sizeof(R));
    R *dhf_all = A->dh; /* [N][D] */
    for (int n0 = 0; n0 < N; n0 += LCH) {
        int c = N - n0 < LCH ? N - n0 : LCH;
        RN(mm_nt)(A->dx2 + (size_t)n0 * D, c, D, W->lm, V, A->logit, 0);
        for (int j = 0; j < c; j++) {
            int n = n0 + j;
            R *lg = A->logit + (size_t)j * V;
            if (n % T == T - 1) { /* no next token */
                memset(lg, 0, (size_t)V * sizeof(R));
                continue;
            }
            int tgt = tokens[n + 1];
            const R logit_t = lg[tgt];
            double mx = lg[0];
            for (int u = 1; u < V; u++)
                if (lg[u] > mx) mx = lg[u];
            double se = 0.0;
            const R mxr = (R)mx;
            for (int u = 0; u < V; u++) {
                R eu = EXPR(lg[u] - mxr);
                se += eu;
                lg[u] = eu; /* keep e^(l - max) */
            }
            double lse = mx + log(se);
            nll += lse - (double)logit_t;
            const R sc = (R)(inv_ntok / se);
            for (int u = 0; u < V; u++) lg[u] *= sc;
            lg[tgt] -= (R)inv_ntok;
        }
        RN(mm_nn)(A->logit, c, V, W->lm, D, dhf_all + (size_t)n0 * D, 0);
    }
    RN(rmsnorm_back)(A->res, N, D, W->norm, A->rf, dhf_all, A->dres);
    ws->nll_sum = nll;
    ws->n_targets = (long)n_seq * (T - 1);
    ws->n_gates = ng;
    return 0;
}

static void RN(backward)(train_ws *ws, RN(acts) * A, const RN(wts) * W, const double *coef,
                         double *grad_w, double *grad_b, const double *rw)
{
    const int T = ws->T, D = ws->D, qd = ws->nh * ws->hd, kvd = ws->nkv * ws->hd, FF = ws->FF;
    const int n_seq = ws->n_seq, N = n_seq * T;
    const size_t NMAX = (size_t)ws->max_seqs * T;
    const int tok_gran = ws->setup.gran == STAGE_GRAN_TOKEN;
    const int ng = tok_gran ? N : n_seq;
    R *dy = A->dres;
    for (int l = ws->n_layers - 1; l >= ws->first; l--) {
        const RN(lw) *L = &W->L[l];
        const int li = l - ws->first, ri = ws->route_of[l];
        const R *x = A->x + li * NMAX * D, *h = A->h + li * NMAX * D, *x2 = A->x2 + li * NMAX * D;
        const R *q = A->q + li * NMAX * qd, *k = A->k + li * NMAX * kvd,
                *v = A->v + li * NMAX * kvd;
        const R *att = A->att + li * NMAX * qd, *a = A->a + li * NMAX * D;
        const R *f1 = A->f1 + li * NMAX * FF, *f3 = A->f3 + li * NMAX * FF;
        const R *r1 = A->r1 + li * NMAX, *r2 = A->r2 + li * NMAX;
        /* MLP: y = x2 + Wd (silu(f1) f3) */
        RN(mm_nn)(dy, N, D, L->wd, FF, A->u, 0); /* du */
        for (size_t i = 0; i < (size_t)N * FF; i++) {
            R s = RN(sigm)(f1[i]);
            R silu = f1[i] * s;
            A->df3[i] = A->u[i] * silu;
            A->df1[i] = A->u[i] * f3[i] * (s * ((R)1 + f1[i] * ((R)1 - s)));
        }
        RN(mm_nn)(A->df1, N, FF, L->wg, D, A->h2, 0); /* dh2 */
        RN(mm_nn)(A->df3, N, FF, L->wu, D, A->h2, 1);
        memcpy(A->dx2, dy, (size_t)N * D * sizeof(R));
        RN(rmsnorm_back)(x2, N, D, L->ln2, r2, A->h2, A->dx2);
        /* x2 = x + g a */
        const R *g = ri >= 0 ? A->g + (size_t)ri * NMAX : NULL;
        if (g) memset(A->dg, 0, (size_t)ng * sizeof(R));
        for (int n = 0; n < N; n++) {
            const R *dn = A->dx2 + (size_t)n * D, *an = a + (size_t)n * D;
            R *dan = A->dh + (size_t)n * D; /* dh as da scratch */
            R gs = g ? g[tok_gran ? n : n / T] : (R)1;
            double dot = 0.0;
            for (int c = 0; c < D; c++) {
                dot += (double)dn[c] * an[c];
                dan[c] = gs * dn[c];
            }
            if (g) A->dg[tok_gran ? n : n / T] += (R)dot;
        }
        RN(mm_nn)(A->dh, N, D, L->wo, qd, A->datt, 0);
        memset(A->dq, 0, (size_t)N * qd * sizeof(R));
        memset(A->dk, 0, (size_t)N * kvd * sizeof(R));
        memset(A->dv, 0, (size_t)N * kvd * sizeof(R));
        const int win = stage_layer_window(&ws->m->cfg, l);
        for (int s = 0; s < n_seq; s++) {
            RN(attn_back)
            (ws, A, q, k, v, tok_gran ? g : NULL, att, A->datt, A->dq, A->dk, A->dv, A->dg, s * T,
             win);
        }
        for (int n = 0; n < N; n++) {
            RN(rope)(A->dq + (size_t)n * qd, ws->nh, ws->hd, n % T, A->inv_freq, -1);
            RN(rope)(A->dk + (size_t)n * kvd, ws->nkv, ws->hd, n % T, A->inv_freq, -1);
        }
        const R *dq = A->dq, *dk = A->dk;
        if (L->qn) { /* through the per-head norms */
            memset(A->dqp, 0, (size_t)N * qd * sizeof(R));
            memset(A->dkp, 0, (size_t)N * kvd * sizeof(R));
            RN(rmsnorm_back)
            (A->qp + li * NMAX * qd, N * ws->nh, ws->hd, L->qn, A->rq + li * NMAX * ws->nh, A->dq,
             A->dqp);
            RN(rmsnorm_back)
            (A->kp + li * NMAX * kvd, N * ws->nkv, ws->hd, L->kn, A->rk + li * NMAX * ws->nkv,
             A->dk, A->dkp);
            dq = A->dqp;
            dk = A->dkp;
        }
        RN(mm_nn)(dq, N, qd, L->wq, D, A->dh, 0);
        RN(mm_nn)(dk, N, kvd, L->wk, D, A->dh, 1);
        RN(mm_nn)(A->dv, N, kvd, L->wv, D, A->dh, 1);
        if (g) { /* router: z = w . (h_t | mean_t h_t) + b */
            const R *sg = A->sg + (size_t)ri * NMAX;
            const double *w = rw + (size_t)ri * D;
            double *gw = grad_w + (size_t)ri * D;
            for (int gi = 0; gi < ng; gi++) {
                double dz = ((double)A->dg[gi] + coef[ri]) * sg[gi] * (1.0 - sg[gi]);
                grad_b[ri] += dz;
                if (tok_gran) {
                    const R *hn = h + (size_t)gi * D;
                    R *dhn = A->dh + (size_t)gi * D;
                    for (int c = 0; c < D; c++) {
                        gw[c] += dz * hn[c];
                        dhn[c] += (R)(dz * w[c]);
                    }
                } else {
                    const R *mn = A->mean + ((size_t)ri * ws->max_seqs + gi) * D;
                    for (int c = 0; c < D; c++) gw[c] += dz * mn[c];
                    for (int t = 0; t < T; t++) {
                        R *dhn = A->dh + ((size_t)gi * T + t) * D;
                        for (int c = 0; c < D; c++) dhn[c] += (R)(dz * w[c] / T);
                    }
                }
            }
        }
        memcpy(dy, A->dx2, (size_t)N * D * sizeof(R));
        RN(rmsnorm_back)(x, N, D, L->ln1, r1, A->dh, dy);
    }
}

static void RN(acts_free)(RN(acts) * A)
{
    free(A->x);
    free(A->h);
    free(A->r1);
    free(A->r2);
    free(A->q);
    free(A->k);
    free(A->v);
    free(A->att);
    free(A->a);
    free(A->x2);
    free(A->f1);
    free(A->f3);
    free(A->z);
    free(A->sg);
    free(A->g);
    free(A->mean);
    free(A->res);
    free(A->rf);
    free(A->dres);
    free(A->h2);
    free(A->u);
    free(A->df1);
    free(A->df3);
    free(A->dx2);
    free(A->dh);
    free(A->datt);
    free(A->dq);
    free(A->dk);
    free(A->dv);
    free(A->dg);
    free(A->logit);
    free(A->e);
    free(A->inv_freq);
    free(A->qp);
    free(A->kp);
    free(A->rq);
    free(A->rk);
    free(A->dqp);
    free(A->dkp);
    memset(A, 0, sizeof *A);
}

static int RN(acts_alloc)(RN(acts) * A, const train_ws *ws, const stage_config *cfg)
{
    const size_t N = (size_t)ws->max_seqs * ws->T, D = ws->D, FF = ws->FF, V = ws->V;
    const size_t qd = (size_t)ws->nh * ws->hd, kvd = (size_t)ws->nkv * ws->hd;
    const size_t nl = (size_t)(ws->n_layers - ws->first), nr = (size_t)ws->setup.n_routed;
#define AL(p, n) ((p) = calloc((n) > 0 ? (n) : 1, sizeof(R)))
    int ok = AL(A->x, nl * N * D) && AL(A->h, nl * N * D) && AL(A->r1, nl * N) &&
             AL(A->r2, nl * N) && AL(A->q, nl * N * qd) && AL(A->k, nl * N * kvd) &&
             AL(A->v, nl * N * kvd) && AL(A->att, nl * N * qd) && AL(A->a, nl * N * D) &&
             AL(A->x2, nl * N * D) && AL(A->f1, nl * N * FF) && AL(A->f3, nl * N * FF) &&
             AL(A->z, nr * N) && AL(A->sg, nr * N) && AL(A->g, nr * N) &&
             AL(A->mean, nr * ws->max_seqs * D) && AL(A->res, N * D) && AL(A->rf, N) &&
             AL(A->dres, N * D) && AL(A->h2, N * D) && AL(A->u, N * FF) && AL(A->df1, N * FF) &&
             AL(A->df3, N * FF) && AL(A->dx2, N * D) && AL(A->dh, N * D) && AL(A->datt, N * qd) &&
             AL(A->dq, N * qd) && AL(A->dk, N * kvd) && AL(A->dv, N * kvd) && AL(A->dg, N) &&
             AL(A->logit, (size_t)LCH * V) && AL(A->e, (size_t)ws->T) &&
             AL(A->inv_freq, (size_t)ws->hd / 2 + 1);
    const size_t qkn = cfg->qk_norm ? 1 : 0; /* the q/k norm buffers only when used */
    ok = ok && AL(A->qp, qkn * nl * N * qd) && AL(A->kp, qkn * nl * N * kvd) &&
         AL(A->rq, qkn * nl * N * ws->nh) && AL(A->rk, qkn * nl * N * ws->nkv) &&
         AL(A->dqp, qkn * N * qd) && AL(A->dkp, qkn * N * kvd);
#undef AL
    if (!ok) {
        RN(acts_free)(A);
        return -1;
    }
    /* inv_freq as the engine computes it (HF's, with the config's RoPE scaling) */
    float *f = malloc(((size_t)ws->hd / 2 + 1) * sizeof *f);
    if (!f) {
        RN(acts_free)(A);
        return -1;
    }
    stage_arch_inv_freq(cfg, f);
    for (int i = 0; i < ws->hd / 2; i++) A->inv_freq[i] = (R)f[i];
    free(f);
    return 0;
}
