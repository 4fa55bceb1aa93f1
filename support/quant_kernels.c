/* support/quant_kernels.c: the CPU kernels that multiply one token (or a few) by a weight matrix: fp32, quantised
   (int8, int4, NF4), and find NF4 codes; support/quant.py builds this file with the C compiler for the CPU at hand on
   first use and loads it. Each product has an AVX-512 path where the CPU has one, an AVX2 path, and plain C. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define AVX2 1
static float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif
#if defined(AVX2) && defined(__AVX512F__) && defined(__AVX512BW__)
#define AVX512 1
#endif
#if defined(AVX512) && defined(__AVX512VNNI__)
#define VNNI512 1 /* int4's 64-byte loops (vpdpbusd); without VNNI they take 32 bytes a step, as with AVX2 */
#endif

#define PARALLEL_WORK (1L << 18) /* multiply-adds below which one thread is faster than waking a second */
#define NF4_ROWS 4 /* rows of x that share each decoded NF4 block */
#ifndef PREFETCH
#define PREFETCH 1024 /* bytes ahead asked for early: the hardware prefetcher alone leaves DRAM idle 10-25% */
#endif
/* the same for fp32, int8 and int4 (their AVX2 loops too), tuned on a Zen 5 with 2 threads: 1 KB ahead was 10-30%
   slower than 8 KB, 16-32 KB no faster */
#ifndef FP32_PREFETCH
#define FP32_PREFETCH 8192
#endif
#ifndef INT8_PREFETCH
#define INT8_PREFETCH 8192
#endif
#ifndef INT4_PREFETCH
#define INT4_PREFETCH 8192
#endif
#ifndef LOCALITY
#define LOCALITY 3 /* __builtin_prefetch's locality: into L1 (L2 only, or non-temporal, was no faster) */
#endif
#define FP32_ROWS 4 /* rows of x multiplied by each fp32 or int8 weight row as it streams in */

/* y[m, n] for T <= FP32_ROWS rows m of x and one row of w: fp32 dot products over K. Inlined with a constant T, so
   that the sums stay in registers. (Two rows of w a step, sharing the loads of x, streamed ~25% slower.) */
static inline __attribute__((always_inline)) void fp32_dots(const float* x, const float* wn, float* y, long N,
                                                             long K, int T) {
  float acc[FP32_ROWS] = {0};
  long k = 0;
#if defined(AVX512)
  __m512 a[FP32_ROWS];
  for (int t = 0; t < T; t++) a[t] = _mm512_setzero_ps();
  for (; k < K; k += 16) {  /* 16 columns a step, the last one masked */
    __mmask16 mask = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
    __builtin_prefetch(wn + k + FP32_PREFETCH / 4, 0, LOCALITY);
    __m512 w = _mm512_maskz_loadu_ps(mask, wn + k);
    for (int t = 0; t < T; t++) a[t] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mask, x + t * K + k), a[t]);
  }
  for (int t = 0; t < T; t++) acc[t] = _mm512_reduce_add_ps(a[t]);
#elif defined(AVX2)
  __m256 a[FP32_ROWS];
  for (int t = 0; t < T; t++) a[t] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    if (k % 16 == 0) __builtin_prefetch(wn + k + FP32_PREFETCH / 4, 0, LOCALITY);
    __m256 w = _mm256_loadu_ps(wn + k);
    for (int t = 0; t < T; t++) a[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * K + k), a[t]);
  }
  for (int t = 0; t < T; t++) acc[t] = hsum(a[t]);
#endif
  for (; k < K; k++)
    for (int t = 0; t < T; t++) acc[t] += wn[k] * x[t * K + k];
  for (int t = 0; t < T; t++) y[t * N] = acc[t];
}

/* y (M, N) = x (M, K) @ w (N, K)^T in fp32, for a few rows of x (decoding): each thread streams its share of the
   rows of w once, each multiplied by up to FP32_ROWS rows of x while it sits in registers */
void fp32_matmul(const float* x, const float* w, float* y, long M, long N, long K) {
  #pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_WORK / 4)
  for (long n = 0; n < N; n++)
    for (long m = 0; m < M; m += FP32_ROWS) {
      const float *xm = x + m * K, *wn = w + n * K;
      float* ym = y + m * N + n;
      switch (M - m < FP32_ROWS ? M - m : FP32_ROWS) {
        case 1: fp32_dots(xm, wn, ym, N, K, 1); break;
        case 2: fp32_dots(xm, wn, ym, N, K, 2); break;
        case 3: fp32_dots(xm, wn, ym, N, K, 3); break;
        default: fp32_dots(xm, wn, ym, N, K, 4);
      }
    }
}

#ifdef AVX512
/* int8_matmul's y[m, n] for T <= FP32_ROWS rows of x and one row of w, with the AVX2 path's numbers: its four 8-lane
   sums over columns k % 32 are the halves of two 16-lane ones here, added in the same order. Each weight is
   converted once for the T rows of x. */
static inline __attribute__((always_inline)) void int8_dots(const float* x, const int8_t* wn, float s, float* y,
                                                             long N, long K, int T) {
  __m512 a[FP32_ROWS][2];
  for (int t = 0; t < T; t++) a[t][0] = a[t][1] = _mm512_setzero_ps();
  long k = 0;
  for (; k + 32 <= K; k += 32) {
    __builtin_prefetch(wn + k + INT8_PREFETCH, 0, LOCALITY);
    for (int j = 0; j < 2; j++) {
      __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wn + k + 16 * j))));
      for (int t = 0; t < T; t++) a[t][j] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + t * K + k + 16 * j), a[t][j]);
    }
  }
  for (int t = 0; t < T; t++) {
    __m256 a0 = _mm512_castps512_ps256(a[t][0]), a1 = _mm512_extractf32x8_ps(a[t][0], 1);
    __m256 a2 = _mm512_castps512_ps256(a[t][1]), a3 = _mm512_extractf32x8_ps(a[t][1], 1);
    float acc = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (long j = k; j < K; j++) acc += x[t * K + j] * wn[j];
    y[t * N] = acc * s;
  }
}
#endif

/* y (M, N) = x (M, K) @ (w (N, K) * s (N))^T: each int8 weight read once, converted in registers, fp32 sums */
void int8_matmul(const float* x, const int8_t* w, const float* s, float* y, long M, long N, long K) {
#ifdef AVX512
  #pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_WORK)
  for (long n = 0; n < N; n++)
    for (long m = 0; m < M; m += FP32_ROWS) {
      const float* xm = x + m * K;
      const int8_t* wn = w + n * K;
      float* ym = y + m * N + n;
      switch (M - m < FP32_ROWS ? M - m : FP32_ROWS) {
        case 1: int8_dots(xm, wn, s[n], ym, N, K, 1); break;
        case 2: int8_dots(xm, wn, s[n], ym, N, K, 2); break;
        case 3: int8_dots(xm, wn, s[n], ym, N, K, 3); break;
        default: int8_dots(xm, wn, s[n], ym, N, K, 4);
      }
    }
#else
  #pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_WORK)
  for (long n = 0; n < N; n++) {
    const int8_t* wn = w + n * K;
    for (long m = 0; m < M; m++) {
      const float* xm = x + m * K;
      float acc = 0;
      long k = 0;
#ifdef AVX2
      __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (; k + 32 <= K; k += 32) {  /* 4 x 8 weights: sign-extend to int32, convert, multiply-add */
        __builtin_prefetch(wn + k + INT8_PREFETCH);
        for (int j = 0; j < 4; j++)
          a[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                     _mm_loadl_epi64((const __m128i*)(wn + k + 8 * j)))),
                                 _mm256_loadu_ps(xm + k + 8 * j), a[j]);
      }
      acc = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
#endif
      for (; k < K; k++) acc += xm[k] * wn[k];
      y[m * N + n] = acc * s[n];
    }
  }
#endif
}

/* int4_matmul: y (M, N) = x (M, K) @ w^T, w[n, k] = q[n, k] * s[n, g] + z[n, g] for group g = k / gs, q in [0, 15]
   two per byte (column 2b in the low nibble of byte b). As llama.cpp does, x is rounded to int8 per block of 32
   columns (xq, step dx = max|x| / 127), so q . x runs in integers: 128 weights a vpdpbusd pair where fp32 takes 16
   an instruction. The codes count as centred, (q - 8) s + (z + 8 s), so that x's rounding errors are multiplied by
   |q - 8| <= 8, but the centring is x's alone and stays out of the loop over w:
     y[m, n] = sum_b s[n, g(b)] dx[m, b] (q[n] . xq[m] over block b)
             + sum_g (z + 8 s)[n, g] xsum[m, g] - s[n, g] cx[m, g]
   xsum: x summed over group g; cx: 8 dx xq summed over it. */

/* x prepared once per call. Columns [0, V) (whole blocks, V a multiple of 64) in steps of 128: per row and step xv,
   the 64 even columns' int8 values then the 64 odd ones' (the low and high nibbles of the step's 64 packed bytes;
   zero past V), and dv, the blocks' steps spread over the 16 int32 lanes of vpdpbusd (lane l sums columns 8l..8l+7
   of the step: block l / 4). The columns from V on (a last block where K % 64 == 32; all of them without AVX2, or
   where groups split blocks) are multiplied one at a time from xq and dx. */
typedef struct {
  long S, V;         /* steps of 128 columns (the last one half where V % 128 == 64), columns in them */
  int8_t *xq, *xv;   /* (M, K); (M, S, 128) */
  float *dx, *dv;    /* (M, blocks); (M, S, 16) */
  float *xsum, *cx;  /* (M, G) each */
  int32_t* gb;       /* (S, 4): each block of a step's group (past K: the last group, its lanes zero) */
} int4_x;

#ifdef AVX2
/* A block of 32 columns of x (xb) rounded as llama.cpp's Q8_0 (step max|x| / 127; the conversion rounds to nearest
   even, as lrintf): q, and the step; the columns added to *group, and q's sum to *qsum */
static float int4_block(const float* xb, int8_t* q, __m256* group, int* qsum) {
  __m256 v[4], a = _mm256_setzero_ps();
  for (int j = 0; j < 4; j++) {
    v[j] = _mm256_loadu_ps(xb + 8 * j);
    a = _mm256_max_ps(a, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v[j]));
    *group = _mm256_add_ps(*group, v[j]);
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  __m256 inv = _mm256_set1_ps(amax > 0 ? 127 / amax : 0);
  __m256i sum = _mm256_setzero_si256();
  int32_t qi[32];
  for (int j = 0; j < 4; j++) {
    __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
    sum = _mm256_add_epi32(sum, r);
    _mm256_storeu_si256((__m256i*)(qi + 8 * j), r);
  }
  for (int k = 0; k < 32; k++) q[k] = (int8_t)qi[k];
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
  *qsum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1)));
  return amax / 127;
}
#endif

static int4_x int4_prepare(const float* x, long M, long K, long gs, long V) {
  long G = K / gs, B = (K + 31) / 32, S = (V + 127) / 128;
  int4_x p = {S, V};
  p.xq = malloc(M * K + M * S * 128);
  p.xv = p.xq + M * K;
  memset(p.xv, 0, M * S * 128);
  p.dx = calloc(M * B + M * S * 16 + 2 * M * G, sizeof(float));
  p.dv = p.dx + M * B;
  p.xsum = p.dv + M * S * 16;
  p.cx = p.xsum + M * G;
  p.gb = malloc((S * 4 + 1) * sizeof(int32_t));
  for (long b = 0; b < S * 4; b++) p.gb[b] = (int32_t)(32 * b < K ? 32 * b / gs : G - 1);
  for (long m = 0; m < M; m++) {
    const float* xm = x + m * K;
    int8_t *q = p.xq + m * K, *v = p.xv + m * S * 128;
    float *xsum = p.xsum + m * G, *cx = p.cx + m * G;
#ifdef AVX2
    __m256 group = _mm256_setzero_ps();
#endif
    for (long b = 0; b < B; b++) {
      float step;
#ifdef AVX2
      if (gs % 32 == 0) {  /* whole blocks, each inside a group */
        int qsum;
        step = int4_block(xm + 32 * b, q + 32 * b, &group, &qsum);
        cx[32 * b / gs] += 8 * step * (float)qsum;
        if ((32 * b + 32) % gs == 0) {
          xsum[32 * b / gs] = hsum(group);
          group = _mm256_setzero_ps();
        }
      } else
#endif
      {
        long end = 32 * b + 32 < K ? 32 * b + 32 : K;
        float amax = 0;
        for (long k = 32 * b; k < end; k++) amax = fmaxf(amax, fabsf(xm[k]));
        float inv = amax > 0 ? 127 / amax : 0;
        step = amax / 127;
        for (long k = 32 * b; k < end; k++) {
          q[k] = (int8_t)lrintf(xm[k] * inv);
          xsum[k / gs] += xm[k];
          cx[k / gs] += 8 * step * q[k];
        }
      }
      p.dx[m * B + b] = step;
      if (32 * b < V) {  /* the vector loop's layout: 16 even columns, 16 odd, a step's lanes 4 (b % 4) .. + 3 */
        int8_t* st = v + b / 4 * 128 + b % 4 * 16;
        for (int k = 0; k < 16; k++) {
          st[k] = q[32 * b + 2 * k];
          st[64 + k] = q[32 * b + 2 * k + 1];
        }
        for (int l = 0; l < 4; l++) p.dv[(m * S + b / 4) * 16 + b % 4 * 4 + l] = step;
      }
    }
  }
  return p;
}

static void int4_release(int4_x* p) {
  free(p->xq);
  free(p->dx);
  free(p->gb);
}

/* The rest of y[m, n] after the vector loop: columns [V, K) one byte (two columns) at a time, and (groups) the groups'
   terms */
static float int4_rest(const int4_x* p, const uint8_t* wn, const float* sn, const float* zn, long m, long K, long gs,
                       int groups) {
  long G = K / gs, B = (K + 31) / 32;
  const int8_t* q = p->xq + m * K;
  float acc = 0;
  for (long b = p->V / 2; b < K / 2; b++)
    acc += sn[2 * b / gs] * p->dx[m * B + 2 * b / 32] * (float)((wn[b] & 15) * q[2 * b] + (wn[b] >> 4) * q[2 * b + 1]);
  for (long g = 0; groups && g < G; g++)
    acc += (zn[g] + 8 * sn[g]) * p->xsum[m * G + g] - sn[g] * p->cx[m * G + g];
  return acc;
}

#ifdef VNNI512
/* y[m, n] over the vector loop's columns, and the groups' terms, for a row of w (wn; its scales sn, zeros zn) and row
   m of x. One row of w at a time: four sharing the loads of x were 1.7x faster with w in cache, but 20% slower
   streaming it from memory (four streams a thread), as decoding does. */
static float int4_row512(const int4_x* p, const uint8_t* wn, const float* sn, const float* zn, long m, long G) {
  const __m512i nibbles = _mm512_set1_epi8(15);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc = _mm512_setzero_ps();
  const int8_t* xv = p->xv + m * p->S * 128;
  const float* dv = p->dv + m * p->S * 16;
  for (long t = 0; t < p->S; t++) {
    __mmask64 mask = 128 * t + 128 <= p->V ? ~0ULL : 0xffffffffULL;  /* a half step: its first 32 bytes */
    const int32_t* g = p->gb + 4 * t;
    __builtin_prefetch(wn + 64 * t + INT4_PREFETCH, 0, LOCALITY);
    __m512i v = _mm512_maskz_loadu_epi8(mask, wn + 64 * t);
    __m512i lo = _mm512_and_si512(v, nibbles), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibbles);
    __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xv + 128 * t)),
                                      hi, _mm512_loadu_si512(xv + 128 * t + 64));
    __m512 sc = g[0] == g[3] ? _mm512_set1_ps(sn[g[0]])
                             : _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(
                                                                 _mm_set_ps(sn[g[3]], sn[g[2]], sn[g[1]], sn[g[0]])));
    acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(dv + 16 * t)), sc, acc);
  }
  for (long g = 0; g < G; g += 16) {  /* the groups' terms, 16 a step */
    __mmask16 mask = G - g >= 16 ? 0xffff : (__mmask16)((1u << (G - g)) - 1);
    __m512 sg = _mm512_maskz_loadu_ps(mask, sn + g), zg = _mm512_maskz_loadu_ps(mask, zn + g);
    acc = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_set1_ps(8), sg, zg), _mm512_maskz_loadu_ps(mask, p->xsum + m * G + g),
                          acc);
    acc = _mm512_fnmadd_ps(sg, _mm512_maskz_loadu_ps(mask, p->cx + m * G + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

#ifdef AVX2
/* int4_matmul for many rows of x (a prompt): tiles of TILE_M rows of x by TILE_N rows of w. x is prepared once per
   call (int4_tile_x), each tile of w once (int4_tile_w), in the layouts the tile's loop (int4_tile) reads in order,
   so that the loop is little more than integer dot products of whole registers (VEC bytes, LANES int32 lanes of 4
   bytes) and one conversion and scaling per block. A byte is a pair of columns (2c, 2c + 1: the low and high nibble
   of a packed byte), in one register of the even columns' values and one of the odd. The steps: first K / WIDE of
   WIDE columns, 4 pairs of registers, lane l of pair k holding columns 32 l + 8 k .. 32 l + 8 k + 7, so that a lane
   sums a whole block; then steps of 8 LANES columns, 1 pair, lane l holding columns 8 l .. 8 l + 7, the last zero
   past K. x is stored as x + 128 (unsigned bytes, 1 to 255) and w as q - 8 (signed); each lane's sum starts from
   -128 x the sum of its q - 8, so that it ends as the integer x . (q - 8). Beside each row of x, xsum:
   x summed per group, Gp (G rounded up to a register) a row, zeros past G; after a tile of w, z + 8 s per group.
   Registers of 64 bytes where the CPU has AVX-512 VNNI (vpdpbusd), else of 32 (vpmaddubsw). */
#ifdef VNNI512
#define VEC 64
#define TILE_M 4
#define TILE_N 4
#define TILE_FROM 3 /* rows of x from which the tiles are faster (with 2 rows the row loop is as fast or 10% faster) */
#else
#define VEC 32
#define TILE_M 1 /* 16 registers: x's 8 of a wide step, each then multiplied by 12 rows of w (2 x 4: 10-15% slower) */
#define TILE_N 12
#define TILE_FROM 2 /* 1.25x the row loop with 2 rows of x, 1.5x with 3 */
#endif
#define LANES (VEC / 4)
#define WIDE (32 * LANES)
/* bytes of a step of R register pairs: of x, the pairs, then each lane's block's step max|x| / 127 (fp32); of a row
   of w, the pairs, each lane's starting value (int32), each lane's group's scale s (fp32) */
#define X_STEP(R) (2 * VEC * (R) + VEC)
#define W_STEP(R) (2 * VEC * (R) + 2 * VEC)
static long tile_narrow(long K) { return (K % WIDE + 8 * LANES - 1) / (8 * LANES); }  /* steps after the wide ones */
static long tile_xrow(long K) { return X_STEP(4) * (K / WIDE) + X_STEP(1) * tile_narrow(K); }
static long tile_wsize(long K, long Gp) {
  return TILE_N * (W_STEP(4) * (K / WIDE) + W_STEP(1) * tile_narrow(K) + Gp * (long)sizeof(float));
}

/* A row of x (K columns, gs a multiple of 32) in int4_tile's layout (xt, zeroed beforehand), and its xsum: each
   block rounded to int8 as the row loop does (Q8_0: step max|x| / 127, converted rounding to nearest as lrintf) */
static void int4_tile_x(const float* xm, long K, long gs, uint8_t* xt, float* xsum) {
  long blocks = K / WIDE * LANES;  /* in the wide steps */
  __m256 group = _mm256_setzero_ps();
  for (long b = 0; b < K / 32; b++) {
    int8_t q[32];
    int qsum;
    float step = int4_block(xm + 32 * b, q, &group, &qsum);
    int R = b < blocks ? 4 : 1;
    uint8_t* st = b < blocks ? xt + b / LANES * X_STEP(4)
                             : xt + blocks / LANES * X_STEP(4) + (b - blocks) / (LANES / 4) * X_STEP(1);
    long lane = b < blocks ? b % LANES : (b - blocks) % (LANES / 4) * 4;  /* the block's (first) lane */
    for (int k = 0; k < 32; k++)
      st[(R == 4 ? k / 8 * 2 * VEC : 0) + k % 2 * VEC + 4 * (R == 4 ? lane : lane + k / 8) + k % 8 / 2] =
          (uint8_t)(q[k] + 128);
    for (int l = 0; l < 4 / R; l++) ((float*)(st + 2 * VEC * R))[lane + l] = step;
    if ((32 * b + 32) % gs == 0) {
      xsum[(32 * b + 32) / gs - 1] = hsum(group);
      group = _mm256_setzero_ps();
    }
  }
}

/* Rows n0 .. n0 + TILE_N - 1 of w (p, s, z: at row n0; rows K / 2 bytes, G scales apart) in int4_tile's layout (wt:
   per step the TILE_N rows' steps, then their z + 8 s); rows past N, and lanes past K, are zero. group: each
   block's group. */
static void int4_tile_w(const uint8_t* p, const float* s, const float* z, long n0, long N, long K, long G, long Gp,
                        const int32_t* group, uint8_t* wt) {
  long wide = K / WIDE;
  float* zs = (float*)(wt + tile_wsize(K, Gp)) - TILE_N * Gp;
  for (int r = 0; r < TILE_N; r++) {
    int live = n0 + r < N;
    const uint8_t* pr = p + r * (K / 2);
    const float* sr = s + r * G;
    for (long g = 0; g < Gp; g++) zs[r * Gp + g] = live && g < G ? z[r * G + g] + 8 * sr[g] : 0;
    for (long t = 0; t < wide + tile_narrow(K); t++) {
      int R = t < wide ? 4 : 1;
      uint8_t* ws = t < wide ? wt + (t * TILE_N + r) * W_STEP(4)
                             : wt + wide * TILE_N * W_STEP(4) + ((t - wide) * TILE_N + r) * W_STEP(1);
      if (!live) {
        memset(ws, 0, W_STEP(R));
        continue;
      }
      long b0 = t < wide ? LANES * t : LANES * wide + LANES / 4 * (t - wide);  /* the step's first block */
      const uint8_t* at = pr + 16 * b0;
      uint8_t last[VEC];  /* a last narrow step's bytes, then q = 8 (stored as 0) */
      if (R == 1 && K / 2 - 16 * b0 < VEC) {
        memset(last, 0x88, VEC);
        memcpy(last, at, K / 2 - 16 * b0);
        at = last;
      }
      float* scale = (float*)(ws + 2 * VEC * R + VEC);
      for (int l = 0; l < LANES; l++) {
        long b = b0 + (R == 4 ? l : l / 4);
        scale[l] = b < K / 32 ? sr[group[b]] : 0;
      }
#ifdef VNNI512
      /* a wide step: 4 registers of 4 blocks each; pair k's lane l <- register l / 4's lane 4 (l % 4) + k */
      __m512i v[4];
      if (R == 4) {
        const __m512i chunks = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
        for (int j = 0; j < 4; j++) v[j] = _mm512_permutexvar_epi32(chunks, _mm512_loadu_si512(at + 64 * j));
        __m512i a = _mm512_shuffle_i32x4(v[0], v[1], 0x44), b = _mm512_shuffle_i32x4(v[0], v[1], 0xee);
        __m512i c = _mm512_shuffle_i32x4(v[2], v[3], 0x44), d = _mm512_shuffle_i32x4(v[2], v[3], 0xee);
        v[0] = _mm512_shuffle_i32x4(a, c, 0x88), v[1] = _mm512_shuffle_i32x4(a, c, 0xdd);
        v[2] = _mm512_shuffle_i32x4(b, d, 0x88), v[3] = _mm512_shuffle_i32x4(b, d, 0xdd);
      } else {
        v[0] = _mm512_loadu_si512(at);
      }
      const __m512i nibbles = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(8), x128 = _mm512_set1_epi8((char)128);
      __m512i sum = _mm512_setzero_si512();
      for (int k = 0; k < R; k++) {
        __m512i lo = _mm512_sub_epi8(_mm512_and_si512(v[k], nibbles), eight);
        __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v[k], 4), nibbles), eight);
        _mm512_store_si512(ws + 2 * VEC * k, lo);
        _mm512_store_si512(ws + 2 * VEC * k + VEC, hi);
        sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sum, x128, lo), x128, hi);
      }
      _mm512_store_si512(ws + 2 * VEC * R, _mm512_sub_epi32(_mm512_setzero_si512(), sum));
#else
      /* a wide step: 4 registers of 2 blocks each; pair k's lane l <- register l / 2's lane 4 (l % 2) + k */
      __m256i v[4];
      if (R == 4) {
        const __m256i pairs = _mm256_set_epi32(7, 3, 6, 2, 5, 1, 4, 0);
        for (int j = 0; j < 4; j++)
          v[j] = _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i*)(at + 32 * j)), pairs);
        __m256i a = _mm256_unpacklo_epi64(v[0], v[1]), b = _mm256_unpackhi_epi64(v[0], v[1]);
        __m256i c = _mm256_unpacklo_epi64(v[2], v[3]), d = _mm256_unpackhi_epi64(v[2], v[3]);
        v[0] = _mm256_permute2x128_si256(a, c, 0x20), v[1] = _mm256_permute2x128_si256(b, d, 0x20);
        v[2] = _mm256_permute2x128_si256(a, c, 0x31), v[3] = _mm256_permute2x128_si256(b, d, 0x31);
      } else {
        v[0] = _mm256_loadu_si256((const __m256i*)at);
      }
      const __m256i nibbles = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8), x128 = _mm256_set1_epi8((char)128);
      __m256i sum = _mm256_setzero_si256();  /* int16: 8 x 2 x 128 x 8 at most */
      for (int k = 0; k < R; k++) {
        __m256i lo = _mm256_sub_epi8(_mm256_and_si256(v[k], nibbles), eight);
        __m256i hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v[k], 4), nibbles), eight);
        _mm256_store_si256((__m256i*)(ws + 2 * VEC * k), lo);
        _mm256_store_si256((__m256i*)(ws + 2 * VEC * k + VEC), hi);
        sum = _mm256_add_epi16(sum, _mm256_add_epi16(_mm256_maddubs_epi16(x128, lo), _mm256_maddubs_epi16(x128, hi)));
      }
      _mm256_store_si256((__m256i*)(ws + 2 * VEC * R),
                         _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_madd_epi16(sum, _mm256_set1_epi16(1))));
#endif
    }
  }
}

/* int4_tile's steps of R register pairs, from xt (TILE_M rows xrow bytes apart) and wt, added to acc: per lane, its
   integer (vpdpbusd; or vpmaddubsw, whose int16 sums of 8 pairs stay within 8 x 2 x 255 x 8 < 2^15, and vpmaddwd),
   converted, times its block's step times its group's scale */
#ifdef VNNI512
static inline __attribute__((always_inline)) void int4_tile_steps(const uint8_t* xt, long xrow, const uint8_t* wt,
                                                                   long steps, int R, __m512 acc[TILE_M][TILE_N]) {
  for (long t = 0; t < steps; t++) {
    const uint8_t* ws = wt + t * TILE_N * W_STEP(R);
    #pragma GCC unroll 4  /* so that acc stays in registers (else GCC may keep w there, acc in memory) */
    for (int i = 0; i < TILE_M; i++) {
      const uint8_t* xs = xt + i * xrow + t * X_STEP(R);
      __m512i xv[8];
      for (int j = 0; j < 2 * R; j++) xv[j] = _mm512_load_si512(xs + VEC * j);
      __m512 dx = _mm512_load_ps(xs + 2 * VEC * R);
      for (int r = 0; r < TILE_N; r++) {
        const uint8_t* wr = ws + r * W_STEP(R);
        __m512i dot = _mm512_load_si512(wr + 2 * VEC * R);
        for (int j = 0; j < 2 * R; j++) dot = _mm512_dpbusd_epi32(dot, xv[j], _mm512_load_si512(wr + VEC * j));
        __m512 sc = _mm512_mul_ps(dx, _mm512_load_ps(wr + 2 * VEC * R + VEC));
        acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc[i][r]);
      }
    }
  }
}
#else
static inline __attribute__((always_inline)) void int4_tile_steps(const uint8_t* xt, long xrow, const uint8_t* wt,
                                                                   long steps, int R, __m256 acc[TILE_M][TILE_N]) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (long t = 0; t < steps; t++) {
    const uint8_t* ws = wt + t * TILE_N * W_STEP(R);
    for (int i = 0; i < TILE_M; i++) {
      const uint8_t* xs = xt + i * xrow + t * X_STEP(R);
      __m256 dx = _mm256_load_ps((const float*)(xs + 2 * VEC * R));
      for (int r = 0; r < TILE_N; r++) {
        const uint8_t* wr = ws + r * W_STEP(R);
        __m256i pairs = _mm256_setzero_si256();
        for (int j = 0; j < 2 * R; j++)
          pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(_mm256_load_si256((const __m256i*)(xs + VEC * j)),
                                                               _mm256_load_si256((const __m256i*)(wr + VEC * j))));
        __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(pairs, ones),
                                       _mm256_load_si256((const __m256i*)(wr + 2 * VEC * R)));
        __m256 sc = _mm256_mul_ps(dx, _mm256_load_ps((const float*)(wr + 2 * VEC * R + VEC)));
        acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sc, acc[i][r]);
      }
    }
  }
}
#endif

/* y[i, r] (rows N apart) for i < rm <= TILE_M rows of x prepared (xt, rows xrow bytes apart; xsum, rows Gp apart) and
   r < rn <= TILE_N rows of w prepared (wt): per block the row loop's integers times the same scale products, and the
   zeros' terms, summed in another order */
static inline __attribute__((always_inline)) void int4_tile(const uint8_t* xt, long xrow, const float* xsum,
                                                             const uint8_t* wt, long K, long Gp, float* y, long N,
                                                             int rm, int rn) {
  const float* zs = (const float*)(wt + tile_wsize(K, Gp)) - TILE_N * Gp;
  float sums[TILE_M][TILE_N];  /* all of them, so that the sums stay in registers */
  long wide = K / WIDE;
#ifdef VNNI512
  __m512 acc[TILE_M][TILE_N];
  for (int i = 0; i < TILE_M; i++)
    for (int r = 0; r < TILE_N; r++) acc[i][r] = _mm512_setzero_ps();
  int4_tile_steps(xt, xrow, wt, wide, 4, acc);
  int4_tile_steps(xt + wide * X_STEP(4), xrow, wt + wide * TILE_N * W_STEP(4), tile_narrow(K), 1, acc);
  for (long g = 0; g < Gp; g += LANES)
    for (int i = 0; i < TILE_M; i++)
      for (int r = 0; r < TILE_N; r++)
        acc[i][r] = _mm512_fmadd_ps(_mm512_loadu_ps(xsum + i * Gp + g), _mm512_loadu_ps(zs + r * Gp + g), acc[i][r]);
  for (int i = 0; i < TILE_M; i++)
    for (int r = 0; r < TILE_N; r++) sums[i][r] = _mm512_reduce_add_ps(acc[i][r]);
#else
  __m256 acc[TILE_M][TILE_N];
  for (int i = 0; i < TILE_M; i++)
    for (int r = 0; r < TILE_N; r++) acc[i][r] = _mm256_setzero_ps();
  int4_tile_steps(xt, xrow, wt, wide, 4, acc);
  int4_tile_steps(xt + wide * X_STEP(4), xrow, wt + wide * TILE_N * W_STEP(4), tile_narrow(K), 1, acc);
  for (long g = 0; g < Gp; g += LANES)
    for (int i = 0; i < TILE_M; i++)
      for (int r = 0; r < TILE_N; r++)
        acc[i][r] = _mm256_fmadd_ps(_mm256_loadu_ps(xsum + i * Gp + g), _mm256_loadu_ps(zs + r * Gp + g), acc[i][r]);
  for (int i = 0; i < TILE_M; i++)
    for (int r = 0; r < TILE_N; r++) sums[i][r] = hsum(acc[i][r]);
#endif
  for (int i = 0; i < rm; i++)
    for (int r = 0; r < rn; r++) y[i * N + r] = sums[i][r];
}

/* int4_matmul in tiles (gs a multiple of 32): x prepared by the threads a row each (rows past M zero, filling the
   last tile), then each thread takes its share of the tiles of w, prepares each and multiplies it by every tile of
   x in turn (the prepared tile stays in L1) */
static void int4_tiled(const float* x, const uint8_t* w, const float* s, const float* z, float* y,
                       long M, long N, long K, long gs) {
  long G = K / gs, Gp = (G + LANES - 1) / LANES * LANES, Mp = (M + TILE_M - 1) / TILE_M * TILE_M;
  long xrow = tile_xrow(K), wsize = tile_wsize(K, Gp);
  uint8_t* xt = aligned_alloc(64, (Mp * xrow + 63) / 64 * 64);
  memset(xt, 0, Mp * xrow);
  float* xsum = calloc(Mp * Gp, sizeof(float));
  int32_t* group = malloc(K / 32 * sizeof(int32_t));
  for (long b = 0; b < K / 32; b++) group[b] = (int32_t)(32 * b / gs);
  #pragma omp parallel if (M * N * K >= PARALLEL_WORK)
  {
    #pragma omp for schedule(static)
    for (long m = 0; m < M; m++) int4_tile_x(x + m * K, K, gs, xt + m * xrow, xsum + m * Gp);
    uint8_t* wt = aligned_alloc(64, (wsize + 63) / 64 * 64);
    #pragma omp for schedule(static)
    for (long n0 = 0; n0 < N; n0 += TILE_N) {
      int4_tile_w(w + n0 * (K / 2), s + n0 * G, z + n0 * G, n0, N, K, G, Gp, group, wt);
      for (long m0 = 0; m0 < M; m0 += TILE_M)
        int4_tile(xt + m0 * xrow, xrow, xsum + m0 * Gp, wt, K, Gp, y + m0 * N + n0, N,
                  M - m0 < TILE_M ? (int)(M - m0) : TILE_M, N - n0 < TILE_N ? (int)(N - n0) : TILE_N);
    }
    free(wt);
  }
  free(xt);
  free(xsum);
  free(group);
}
#endif

void int4_matmul(const float* x, const uint8_t* w, const float* s, const float* z, float* y,
                 long M, long N, long K, long gs) {
#ifdef AVX2
  if (M >= TILE_FROM && gs % 32 == 0) {  /* a prompt, in tiles */
    int4_tiled(x, w, s, z, y, M, N, K, gs);
    return;
  }
#endif
  long G = K / gs;
#ifdef AVX2
  long V = gs % 32 == 0 ? K - K % 64 : 0;  /* the vector loop's columns: whole blocks, each inside one group */
#else
  long V = 0;
#endif
  int4_x p = int4_prepare(x, M, K, gs, V);
  #pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_WORK)
  for (long n = 0; n < N; n++) {
    const uint8_t* wn = w + n * (K / 2);
    const float *sn = s + n * G, *zn = z + n * G;
    for (long m = 0; m < M; m++) {
#ifdef VNNI512
      y[m * N + n] = int4_row512(&p, wn, sn, zn, m, G) + int4_rest(&p, wn, sn, zn, m, K, gs, 0);
#else
      float acc = 0;
#ifdef AVX2
      const __m256i nibble = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
      __m256 vacc = _mm256_setzero_ps();
      for (long c = 0; c < V / 64; c++) {  /* 32 bytes = 64 weights, blocks 2c and 2c + 1 */
        __builtin_prefetch(wn + 32 * c + INT4_PREFETCH);
        __m256i v = _mm256_loadu_si256((const __m256i*)(wn + 32 * c));
        __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        const int8_t* xc = p.xv + (m * p.S + c / 2) * 128 + c % 2 * 32;
        __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)xc)),
                                         _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xc + 64))));
        __m256 d = _mm256_loadu_ps(p.dv + (m * p.S + c / 2) * 16 + c % 2 * 8);
        const int32_t* g = p.gb + 2 * c;
        __m256 sc = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(sn[g[0]])), _mm_set1_ps(sn[g[1]]), 1);
        vacc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)), d), sc, vacc);
      }
      acc = hsum(vacc);
#endif
      y[m * N + n] = acc + int4_rest(&p, wn, sn, zn, m, K, gs, 1);
#endif
    }
  }
  int4_release(&p);
}

/* nf4_quantize's blocks of 64 fp32 weights (n of them): each block's absmax, and each weight's code, the number of
   the 15 midpoints between NF4 values below w / absmax (torch.bucketize's count), two per byte, high nibble first */
void nf4_quantize(const float* w, long n, const float* mids, float* absmax, uint8_t* packed) {
  #pragma omp parallel for schedule(static)
  for (long b = 0; b < n; b++) {
    const float* x = w + 64 * b;
    float a = 0;
    for (int k = 0; k < 64; k++) a = fmaxf(a, fabsf(x[k]));
    absmax[b] = a;
    float d = a > 1e-12f ? a : 1e-12f;
    uint8_t code[64];
    for (int k = 0; k < 64; k++) {
      float v = x[k] / d;
      int i = 0;
      for (int j = 0; j < 15; j++) i += mids[j] < v;
      code[k] = (uint8_t)i;
    }
    for (int j = 0; j < 32; j++) packed[32 * b + j] = (uint8_t)(code[2 * j] << 4 | code[2 * j + 1]);
  }
}

/* NF4 weight w (N, K), K a multiple of 32: its N * K weights, row after row, in blocks of 64 (32 bytes, the even
   weight in the high nibble), w = code[q] * the block's absmax, stored as aq[b] * as[b / 256] + offset (double
   quantisation). A row starts on a block boundary, or (K % 64 == 32) every other row half-way into a block. */
static float nf4_absmax(const int8_t* aq, const float* as, float offset, long b) {
  return aq[b] * as[b / 256] + offset;
}

/* x[col0:col1] . w[n, col0:col1] in fp32, weight by weight: the parts of a row outside whole blocks, and every row
   without AVX2 (the dequantised product's numbers) */
static float nf4_dot(const float* x, const uint8_t* w, const int8_t* aq, const float* as, float offset,
                     const float* code, long n, long K, long col0, long col1) {
  float acc = 0;
  for (long k = col0; k < col1; k++) {
    long f = n * K + k;
    acc += code[f % 2 ? w[f / 2] & 15 : w[f / 2] >> 4] * nf4_absmax(aq, as, offset, f / 64) * x[k];
  }
  return acc;
}

/* y (M, N) = x (M, K) @ w^T. With AVX2, whole blocks in integers: two vpshufb byte tables turn the codes into int16
   (code x 32767), each block of x is rounded to int16 (x 16383 / its max), and vpmaddwd multiplies 16 weights an
   instruction, ~5e-5 off the dequantised product, where fp32 lookups (vpermps and a blend) took three times the
   instructions. Each block is decoded once for NF4_ROWS rows of x. */
void nf4_matmul(const float* x, const uint8_t* w, const int8_t* aq, const float* as, const float* off,
                const float* code, float* y, long M, long N, long K) {
  long C = (K - K % 64) / 64, P = K % 64 ? 2 : 1;  /* whole blocks per row; phases: rows start at block offset 0, 32 */
  float offset = *off;
  int16_t* xq = malloc(P * M * C * 64 * sizeof(int16_t));  /* per phase, row, block: 4 runs of 16 as codes unpack */
  float* step = malloc(P * M * C * sizeof(float));  /* per block of x: its max / 16383, over 32767 for the codes */
  for (long ph = 0; ph < P; ph++)
    for (long m = 0; m < M; m++)
      for (long c = 0; c < C; c++) {
        const float* xb = x + m * K + 32 * ph + 64 * c;
        long i = (ph * M + m) * C + c;
        float amax = 0;
        for (int k = 0; k < 64; k++) amax = fmaxf(amax, fabsf(xb[k]));
        float inv = amax > 0 ? 16383 / amax : 0;
        step[i] = amax / 16383 / 32767;
        for (int k = 0; k < 64; k++) {  /* byte j holds columns 2j (high nibble) and 2j + 1; vpunpck takes bytes */
          int j = k / 2;                /* 0-7 and 16-23 first, then 8-15 and 24-31 */
          xq[64 * i + (k % 2) * 32 + ((j % 16) / 8) * 16 + (j / 16) * 8 + j % 8] = (int16_t)lrintf(xb[k] * inv);
        }
      }
#ifdef AVX2
  int8_t lo_bytes[16], hi_bytes[16];  /* the codes x 32767 as int16, their low and high bytes: vpshufb's tables */
  for (int v = 0; v < 16; v++) {
    int16_t q = (int16_t)lrintf(code[v] * 32767);
    lo_bytes[v] = (int8_t)(q & 255);
    hi_bytes[v] = (int8_t)(q >> 8);
  }
  const __m256i tlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)lo_bytes));
  const __m256i thi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)hi_bytes));
#endif
  #pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_WORK)
  for (long n = 0; n < N; n++) {
    long ph = (n * K) % 64 ? 1 : 0, col0 = 32 * ph, b0 = (n * K + col0) / 64;  /* the row's first whole block */
    const uint8_t* p = w + (n * K + col0) / 2;
    for (long m0 = 0; m0 < M; m0 += NF4_ROWS) {
      long T = M - m0 < NF4_ROWS ? M - m0 : NF4_ROWS, done = 0;  /* whole blocks done in integers */
      float acc[NF4_ROWS] = {0};
#ifdef AVX2
      const __m256i nibble = _mm256_set1_epi8(15);
      __m256 vacc[NF4_ROWS];
      for (int t = 0; t < NF4_ROWS; t++) vacc[t] = _mm256_setzero_ps();
      for (long c = 0; c < C; c++) {
        __builtin_prefetch(p + 32 * c + PREFETCH);
        __m256i v = _mm256_loadu_si256((const __m256i*)(p + 32 * c));
        __m256i idx[2] = {_mm256_and_si256(_mm256_srli_epi16(v, 4), nibble), _mm256_and_si256(v, nibble)};
        __m256i q[4];  /* int16 codes: even columns (two runs of 16), then odd */
        for (int h = 0; h < 2; h++) {
          __m256i l = _mm256_shuffle_epi8(tlo, idx[h]), u = _mm256_shuffle_epi8(thi, idx[h]);
          q[2 * h] = _mm256_unpacklo_epi8(l, u);
          q[2 * h + 1] = _mm256_unpackhi_epi8(l, u);
        }
        float absmax = nf4_absmax(aq, as, offset, b0 + c);
        for (int t = 0; t < NF4_ROWS; t++) {
          if (t >= T) break;
          long i = (ph * M + m0 + t) * C + c;
          const __m256i* xb = (const __m256i*)(xq + 64 * i);
          /* |code| <= 32767, |x| <= 16383: two vpmaddwd sums stay below 2^31 */
          __m256i even = _mm256_add_epi32(_mm256_madd_epi16(q[0], _mm256_loadu_si256(xb)),
                                          _mm256_madd_epi16(q[1], _mm256_loadu_si256(xb + 1)));
          __m256i odd = _mm256_add_epi32(_mm256_madd_epi16(q[2], _mm256_loadu_si256(xb + 2)),
                                         _mm256_madd_epi16(q[3], _mm256_loadu_si256(xb + 3)));
          __m256 s = _mm256_add_ps(_mm256_cvtepi32_ps(even), _mm256_cvtepi32_ps(odd));
          vacc[t] = _mm256_fmadd_ps(s, _mm256_set1_ps(absmax * step[i]), vacc[t]);
        }
      }
      for (int t = 0; t < NF4_ROWS; t++) acc[t] = hsum(vacc[t]);
      done = C;
#endif
      for (long t = 0; t < T; t++) {  /* the half blocks before and after the whole ones, or (no AVX2) all of it */
        const float* xm = x + (m0 + t) * K;
        if (done) acc[t] += nf4_dot(xm, w, aq, as, offset, code, n, K, 0, col0);
        acc[t] += nf4_dot(xm, w, aq, as, offset, code, n, K, done ? col0 + 64 * C : 0, K);
      }
      for (long t = 0; t < T; t++) y[(m0 + t) * N + n] = acc[t];
    }
  }
  free(xq);
  free(step);
}
