// The compiled scan of mem_index="ivf-scan" (fot/search.py, IVFScanSearch): every query's top k over the keys of
// the inverted lists it probes, kept in a buffer of its best k, in one pass over each list.
//
// ivf-gemm scores the same (query, list) pairs with torch's bmm and then selects with torch's topk over a row of
// every score; on a CPU the copies into those rows and the selection cost more than the products. Here each list
// is visited once per KV head: its keys are gathered into a transposed fp32 block, scored against the queries
// that probe it six at a time (register-blocked, 6 queries x 16 keys), and each score is compared with its
// query's current k-th best before it is kept (TopK), so nothing the size of a row is ever written. Slots appended
// since the lists were built (decoding adds one a token) are scored by every query of their head instead.
//
// fot_topk_attend then applies each query's softmax over those scores to the retrieved value rows, read in place,
// so top-k attention neither gathers the keys again nor recomputes their products.
//
// Plain C ABI (loaded with ctypes by fot/native.py): no Python headers, no torch headers, no build system.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace {

struct Hit {
  float s;
  int64_t id;
};

// A query's best k so far: candidates that beat the floor are appended to a buffer of 2k; a full buffer keeps
// its k best (nth_element), whose worst becomes the floor. Amortized O(1) per kept candidate, where a heap pays
// two sifts for each: a query visits its lists in list order, not best first, so many candidates are kept.
struct TopK {
  Hit* h;  // 2k entries
  int64_t n;
  int64_t k;
  float floor;
  inline void push(float s, int64_t id) {
    h[n++] = Hit{s, id};
    if (n == 2 * k) {
      std::nth_element(h, h + k - 1, h + n, [](const Hit& p, const Hit& q) { return p.s > q.s; });
      floor = h[k - 1].s;
      n = k;
    }
  }
};

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

constexpr int QB = 6;   // queries scored together
constexpr int KB = 16;  // keys scored together

// acc[t][u] = sum_h qb[h][t] * kt[h][u] for a block of QB queries (qb: [H][QB]) and KB keys (kt: row stride ld).
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
inline void score_block(const float* kt, int64_t ld, const float* qb, int64_t H, float (*acc)[KB]) {
  __m256 a0[QB], a1[QB];
#pragma GCC unroll 8
  for (int t = 0; t < QB; ++t) a0[t] = _mm256_setzero_ps(), a1[t] = _mm256_setzero_ps();
  for (int64_t h = 0; h < H; ++h) {
    const __m256 k0 = _mm256_loadu_ps(kt + h * ld), k1 = _mm256_loadu_ps(kt + h * ld + 8);
    const float* w = qb + h * QB;
#pragma GCC unroll 8
    for (int t = 0; t < QB; ++t) {
      const __m256 b = _mm256_broadcast_ss(w + t);
      a0[t] = _mm256_fmadd_ps(b, k0, a0[t]), a1[t] = _mm256_fmadd_ps(b, k1, a1[t]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < QB; ++t) _mm256_storeu_ps(acc[t], a0[t]), _mm256_storeu_ps(acc[t] + 8, a1[t]);
}

inline bool any_above(const float* v, float floor) {
  const __m256 f = _mm256_set1_ps(floor);
  const __m256 m = _mm256_or_ps(_mm256_cmp_ps(_mm256_loadu_ps(v), f, _CMP_GT_OQ),
                                _mm256_cmp_ps(_mm256_loadu_ps(v + 8), f, _CMP_GT_OQ));
  return _mm256_movemask_ps(m) != 0;
}
#else
inline bool any_above(const float* v, float floor) {
  bool any = false;
  for (int u = 0; u < KB; ++u) any |= v[u] > floor;
  return any;
}
inline void score_block(const float* kt, int64_t ld, const float* qb, int64_t H, float (*acc)[KB]) {
  for (int t = 0; t < QB; ++t)
    for (int u = 0; u < KB; ++u) acc[t][u] = 0.0f;
  for (int64_t h = 0; h < H; ++h)
    for (int t = 0; t < QB; ++t)
      for (int u = 0; u < KB; ++u) acc[t][u] += qb[h * QB + t] * kt[h * ld + u];
}
#endif

struct Args {
  const float* q;
  int64_t H;
  const int64_t* lists;  // [R, J] global list ids, head-major queries
  int64_t J;
  int64_t X;  // queries per head
  const int32_t* order;
  const int64_t* off;
  const int64_t* len;
  int64_t lists_per_head;
  const void* keys;
  int32_t key_bf16;
  int64_t per_head;  // rows of the flat key buffer per head
  int64_t M;         // order holds head * M + slot
  const uint8_t* valid;
  int64_t valid_stride;
  int64_t G;
  int64_t k;
  int64_t tail_lo, tail_hi;  // slots every query of a head scores besides its lists (appended since they were built)
  float* out_s;
  int64_t* out_ids;
};

// Scores the queries qs[0..nq) of a head (indices into its X) against the keys of the given slots and keeps each
// query's best k: the keys are gathered into a transposed fp32 block kt, the queries scored six at a time.
void score_slots(const Args& a, int64_t head, const std::vector<int64_t>& slot, const int64_t* qs, int64_t nq,
                 TopK* best, std::vector<float>& kt, std::vector<float>& qb) {
  const int64_t H = a.H, r0 = head * a.X;
  const int64_t n = static_cast<int64_t>(slot.size());
  if (n == 0) return;
  // the keys, transposed to [H][np] fp32 (np: n padded to KB with zero keys that are never kept)
  const int64_t np = (n + KB - 1) / KB * KB;
  kt.resize(H * np);
  for (int64_t j0 = 0; j0 < np; j0 += KB) {  // a block of KB keys at a time: each write is KB contiguous floats
    const int64_t nk = std::min<int64_t>(KB, n - j0);
    for (int64_t u = 0; u < KB; ++u) {
      float* dst = kt.data() + j0 + u;
      if (u >= nk) {
        for (int64_t h = 0; h < H; ++h) dst[h * np] = 0.0f;
        continue;
      }
      const int64_t row = head * a.per_head + slot[j0 + u];
      if (j0 + u + 8 < n) {  // the key rows are scattered over the store: fetch ahead
        const int64_t ahead = (head * a.per_head + slot[j0 + u + 8]) * H * (a.key_bf16 ? 2 : 4);
        __builtin_prefetch(static_cast<const char*>(a.keys) + ahead);
        __builtin_prefetch(static_cast<const char*>(a.keys) + ahead + 64);
      }
      if (a.key_bf16) {
        const uint16_t* src = static_cast<const uint16_t*>(a.keys) + row * H;
        for (int64_t h = 0; h < H; ++h) dst[h * np] = bf16_to_float(src[h]);
      } else {
        const float* src = static_cast<const float*>(a.keys) + row * H;
        for (int64_t h = 0; h < H; ++h) dst[h * np] = src[h];
      }
    }
  }
  for (int64_t q0 = 0; q0 < nq; q0 += QB) {
    const int nb = static_cast<int>(std::min<int64_t>(QB, nq - q0));
    for (int t = 0; t < QB; ++t) {  // a short block repeats its last query; only the first nb are kept
      const float* src = a.q + (r0 + qs[q0 + std::min(t, nb - 1)]) * H;
      for (int64_t h = 0; h < H; ++h) qb[h * QB + t] = src[h];
    }
    for (int64_t j0 = 0; j0 < np; j0 += KB) {
      float acc[QB][KB];
      score_block(kt.data() + j0, np, qb.data(), H, acc);
      const int64_t nk = std::min<int64_t>(KB, n - j0);
      for (int t = 0; t < nb; ++t) {
        TopK& b = best[qs[q0 + t]];
        if (nk == KB && !any_above(acc[t], b.floor)) continue;  // the common case once k are found
        for (int64_t u = 0; u < nk; ++u)
          if (acc[t][u] > b.floor) b.push(acc[t][u], slot[j0 + u]);
      }
    }
  }
}

void scan_head(const Args& a, int64_t head) {
  const int64_t H = a.H, X = a.X, J = a.J, k = a.k, L = a.lists_per_head;
  const int64_t r0 = head * X;
  // the queries of each of this head's lists (counting sort of the head's (query, list) pairs)
  std::vector<int64_t> count(L + 1, 0);
  for (int64_t x = 0; x < X; ++x)
    for (int64_t j = 0; j < J; ++j) {
      int64_t c = a.lists[(r0 + x) * J + j] - head * L;
      if (c >= 0 && c < L) ++count[c + 1];
    }
  for (int64_t c = 0; c < L; ++c) count[c + 1] += count[c];
  std::vector<int64_t> fill(count.begin(), count.end() - 1), probe(count[L]);
  for (int64_t x = 0; x < X; ++x)
    for (int64_t j = 0; j < J; ++j) {
      int64_t c = a.lists[(r0 + x) * J + j] - head * L;
      if (c >= 0 && c < L) probe[fill[c]++] = x;
    }

  std::vector<Hit> hits(X * 2 * k);
  std::vector<TopK> best(X);
  for (int64_t x = 0; x < X; ++x) best[x] = TopK{hits.data() + x * 2 * k, 0, k, -std::numeric_limits<float>::infinity()};

  std::vector<float> kt, qb(QB * H);
  std::vector<int64_t> slot;
  const uint8_t* valid = a.valid ? a.valid + (head / a.G) * a.valid_stride : nullptr;
  for (int64_t c = 0; c < L; ++c) {
    const int64_t nq = count[c + 1] - count[c];
    const int64_t gid = head * L + c, len = a.len[gid];
    if (nq == 0 || len == 0) continue;
    slot.clear();
    for (int64_t i = 0; i < len; ++i) {
      int64_t s = static_cast<int64_t>(a.order[a.off[gid] + i]) - head * a.M;
      if (!valid || valid[s]) slot.push_back(s);
    }
    score_slots(a, head, slot, probe.data() + count[c], nq, best.data(), kt, qb);
  }
  if (a.tail_hi > a.tail_lo) {  // the slots appended since the lists were built: every query scores them
    slot.clear();
    for (int64_t s = a.tail_lo; s < a.tail_hi; ++s)
      if (!valid || valid[s]) slot.push_back(s);
    std::vector<int64_t> all(X);
    for (int64_t x = 0; x < X; ++x) all[x] = x;
    score_slots(a, head, slot, all.data(), X, best.data(), kt, qb);
  }
  // best first; ties by slot, so the answer does not depend on the order the lists were visited in
  for (int64_t x = 0; x < X; ++x) {
    TopK& b = best[x];
    std::sort(b.h, b.h + b.n, [](const Hit& p, const Hit& q) { return p.s > q.s || (p.s == q.s && p.id < q.id); });
    float* os = a.out_s + (r0 + x) * k;
    int64_t* oi = a.out_ids + (r0 + x) * k;
    for (int64_t i = 0; i < k; ++i) {
      os[i] = i < b.n ? b.h[i].s : -std::numeric_limits<float>::infinity();
      oi[i] = i < b.n ? b.h[i].id : -1;
    }
  }
}


// Rows [r0, r1) of fot_topk_attend.
void attend_rows(const float* s, const int64_t* ids, int64_t K, int64_t X, const void* values, int32_t bf16,
                 int64_t per_head, int64_t H, float scale, int64_t r0, int64_t r1, float* out, float* lse) {
  std::vector<float> acc(H), w(K);
  for (int64_t r = r0; r < r1; ++r) {
    const float* sr = s + r * K;
    const int64_t* ir = ids + r * K;
    const int64_t base = (r / X) * per_head;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < K; ++i)
      if (ir[i] >= 0) m = std::max(m, scale * sr[i]);
    float* o = out + r * H;
    if (m == -std::numeric_limits<float>::infinity()) {  // nothing retrieved: no weight in the merge
      std::fill(o, o + H, 0.0f);
      lse[r] = m;
      continue;
    }
    float sum = 0.0f;
    for (int64_t i = 0; i < K; ++i) {
      w[i] = ir[i] >= 0 ? std::exp(scale * sr[i] - m) : 0.0f;
      sum += w[i];
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t i = 0; i < K; ++i) {
      if (ir[i] < 0) continue;
      for (int64_t a = i + 1; a < std::min<int64_t>(K, i + 5); ++a)  // the value rows are scattered: fetch ahead
        if (ir[a] >= 0) __builtin_prefetch(static_cast<const char*>(values) + (base + ir[a]) * H * (bf16 ? 2 : 4));
      const float wi = w[i];
      if (bf16) {
        const uint16_t* v = static_cast<const uint16_t*>(values) + (base + ir[i]) * H;
        for (int64_t h = 0; h < H; ++h) acc[h] += wi * bf16_to_float(v[h]);
      } else {
        const float* v = static_cast<const float*>(values) + (base + ir[i]) * H;
        for (int64_t h = 0; h < H; ++h) acc[h] += wi * v[h];
      }
    }
    const float inv = 1.0f / sum;
    for (int64_t h = 0; h < H; ++h) o[h] = acc[h] * inv;
    lse[r] = m + std::log(sum);
  }
}

}  // namespace

extern "C" {

// The p largest of each row of s ([R, C] fp32) by position, in no particular order: the lists each query probes
// (torch.topk sorts them, which costs more than the selection at these sizes).
int fot_top_rows(const float* s, int64_t R, int64_t C, int64_t p, int64_t* out) {
  std::vector<Hit> buf(2 * p);
  for (int64_t r = 0; r < R; ++r) {
    const float* row = s + r * C;
    TopK best{buf.data(), 0, p, -std::numeric_limits<float>::infinity()};
    int64_t c = 0;
    for (; c + KB <= C; c += KB)
      if (any_above(row + c, best.floor))
        for (int64_t u = c; u < c + KB; ++u)
          if (row[u] > best.floor) best.push(row[u], u);
    for (; c < C; ++c)
      if (row[c] > best.floor) best.push(row[c], c);
    if (best.n > p)
      std::nth_element(best.h, best.h + p - 1, best.h + best.n, [](const Hit& a, const Hit& b) { return a.s > b.s; });
    for (int64_t i = 0; i < p; ++i) out[r * p + i] = i < best.n ? best.h[i].id : 0;
  }
  return 0;
}

// The inverted lists of ivf-gemm's assignment (fot/search.py, _Lists) by a counting sort, where torch needs a
// stable argsort of every slot at every window. near and outlier are [heads, stride] (near -1: not indexed); the
// first M slots of each head are listed. Head h's list c is h * (C + 1) + c, c = C its outlier list. Writes
// len and off ([heads * (C + 1)]) and order (head * M + slot, grouped by list, slots ascending within a list);
// returns the number of indexed slots.
int64_t fot_ivf_lists(const int32_t* near, const uint8_t* outlier, int64_t heads, int64_t stride, int64_t M,
                      int64_t C, int32_t* order, int64_t* off, int64_t* len) {
  const int64_t L = C + 1;
  std::fill(len, len + heads * L, 0);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t m = 0; m < M; ++m) {
      const int32_t c = near[h * stride + m];
      if (c >= 0) ++len[h * L + (outlier[h * stride + m] ? C : c)];
    }
  int64_t total = 0;
  for (int64_t l = 0; l < heads * L; ++l) off[l] = total, total += len[l];
  std::vector<int64_t> at(off, off + heads * L);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t m = 0; m < M; ++m) {
      const int32_t c = near[h * stride + m];
      if (c >= 0) order[at[h * L + (outlier[h * stride + m] ? C : c)]++] = static_cast<int32_t>(h * M + m);
    }
  return total;
}

// Returns 0. Queries are head-major: query r belongs to head r / X. lists[r * J + j] is a global list id
// head * lists_per_head + c; list gid holds order[off[gid] .. off[gid] + len[gid]), each entry head * M + slot.
// Key (head, slot) is row head * per_head + slot of keys ([*, H], bf16 if key_bf16 else fp32). valid, when not
// null, is a [B, valid_stride] byte mask read at row head / G. Slots tail_lo .. tail_hi - 1 of each head (appended
// since the lists were built; an empty range for none) are scored by every query of the head. Writes the k best
// (score, slot) of each query, best first, padded with (-inf, -1).
int fot_ivf_scan(const float* q, int64_t R, int64_t H, const int64_t* lists, int64_t J, int64_t X,
                 const int32_t* order, const int64_t* off, const int64_t* len, int64_t lists_per_head,
                 const void* keys, int32_t key_bf16, int64_t per_head, int64_t M, const uint8_t* valid,
                 int64_t valid_stride, int64_t G, int64_t k, int64_t tail_lo, int64_t tail_hi, int32_t threads,
                 float* out_s, int64_t* out_ids) {
  Args a{q, H, lists, J, X, order, off, len, lists_per_head, keys, key_bf16, per_head, M, valid, valid_stride, G, k,
         tail_lo, tail_hi, out_s, out_ids};
  const int64_t heads = X > 0 ? R / X : 0;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(threads, heads));
  if (nt == 1) {
    for (int64_t h = 0; h < heads; ++h) scan_head(a, h);
    return 0;
  }
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < nt; ++t)
    pool.emplace_back([&a, t, nt, heads] {
      for (int64_t h = t; h < heads; h += nt) scan_head(a, h);
    });
  for (auto& th : pool) th.join();
  return 0;
}

// Top-k attention's memory part from the scan's own scores (fot/attention.py, scored_topk_attention): query r
// (head-major: head r / X) retrieved slots ids[r, i] (-1: none) whose keys scored s[r, i] (q . k, fp32). Writes
// out[r] = the softmax of scale * s over the retrieved slots applied to their value rows, read in place (row
// head * per_head + slot of values, [*, H], bf16 if bf16 else fp32), and lse[r] = its log-sum-exp (-inf, and a
// zero row, for a query with nothing retrieved). Nothing the size of [R, K, H] is ever written. Returns 0.
int fot_topk_attend(const float* s, const int64_t* ids, int64_t R, int64_t K, int64_t X, const void* values,
                    int32_t bf16, int64_t per_head, int64_t H, float scale, int32_t threads, float* out, float* lse) {
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(threads, R / 64));  // a thread is worth 64 rows
  const int64_t step = nt > 0 ? (R + nt - 1) / nt : R;
  if (nt == 1) {
    attend_rows(s, ids, K, X, values, bf16, per_head, H, scale, 0, R, out, lse);
    return 0;
  }
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < nt; ++t)
    pool.emplace_back([=] {
      attend_rows(s, ids, K, X, values, bf16, per_head, H, scale, t * step, std::min(R, (t + 1) * step), out, lse);
    });
  for (auto& th : pool) th.join();
  return 0;
}
}
