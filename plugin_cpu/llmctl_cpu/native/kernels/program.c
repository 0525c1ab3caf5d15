/* Replaying a recorded decode step: one C call runs every kernel of the step from a program of
 * PROGRAM_SLOTS-word records laid out as program_abi.h declares.
 *
 * Part of kernels.c's single translation unit (included from there, after common.h): not compiled alone. */

/* ---- replaying a recorded decode step ------------------------------------------------------------------------
 *
 * A decode step of a 30-layer model is ~270 kernel calls; from Python each costs a module call, shape checks,
 * an output allocation and a ctypes conversion of ten to twenty arguments, ~3 ms per step in all (8 % of a
 * 64-sequence step, 30 % of a single stream's). llmctl_cpu.graph records the calls of one step against fixed
 * buffers and hands them here as a program: PROGRAM_SLOTS int64 words per call, the opcode then the arguments
 * in the kernel's own order (pointers as addresses, floats as their bits). The row count and the thread count
 * are not taken from the record but from this call, so one program serves every batch up to the one it was
 * recorded at: each kernel's rows depend on their own inputs only, so the leading rows come out as they would
 * from a smaller step. */
#include "program_abi.h"

#define OP_ENUM(name, code, kernel, attr, rows_arg, float_arg) OP_##name = code,
#define OP_COUNT(name, code, kernel, attr, rows_arg, float_arg) +1
#define OP_ROWS_ARG(name, code, kernel, attr, rows_arg, float_arg) [code] = rows_arg,
enum { PROGRAM_OPS(OP_ENUM) OP_LAST = 0 PROGRAM_OPS(OP_COUNT) };
static const int op_rows_arg[OP_LAST + 1] = {PROGRAM_OPS(OP_ROWS_ARG)};

/* dst row i = src row ids[i] (row_bytes each): the embedding lookup. Returns 0, or 1 + the first i whose id is
 * outside [0, num_rows) (nothing is copied then): the kernels' one convention (common.h). */
int llmctl_gather_rows(const void *src, int64_t row_bytes, int64_t num_rows, const int64_t *ids, int n, void *dst) {
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= num_rows) return i + 1;
    for (int i = 0; i < n; i++)
        memcpy((char *)dst + (size_t)i * row_bytes, (const char *)src + (size_t)ids[i] * row_bytes, (size_t)row_bytes);
    return 0;
}

static inline float bits_to_float(int64_t bits) {
    const uint32_t u = (uint32_t)bits;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define P(i) ((void *)(intptr_t)a[i])
#define I(i) ((int)a[i])

/* Per-opcode wall time of replayed calls, for benchmarks/profile_decode.py: a replayed step is one C call, so no
 * Python-side timer can see inside it. Off unless asked for (one clock read per call when on). */
static int program_timing = 0;
static int64_t program_ns[OP_LAST + 1];

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Turns the timing on or off; copies the nanoseconds accumulated per opcode since the last call into out
 * (OP_DECODE_ATTENTION + 1 entries, index = opcode) when out is not NULL, and starts counting from zero. */
void llmctl_program_timing(int on, int64_t *out) {
    if (out != NULL) memcpy(out, program_ns, sizeof program_ns);
    memset(program_ns, 0, sizeof program_ns);
    program_timing = on;
}

/* Runs n_ops recorded calls at `rows` rows. Returns 0 when all succeeded, else 1 + the index of the call that
 * failed (its kernel's own return code in *code): nothing after it runs. */
int llmctl_run_program(const int64_t *program, int n_ops, int rows, int num_threads, int *code) {
    int64_t t_prev = program_timing ? now_ns() : 0;
    for (int i = 0; i < n_ops; i++) {
        const int64_t op = program[(int64_t)i * PROGRAM_SLOTS];
        if (op < 1 || op > OP_LAST) {
            *code = -2;
            return i + 1;
        }
        /* The record's words with its row-count slot set to this call's rows (the table says which slot). */
        int64_t a[PROGRAM_SLOTS - 1];
        memcpy(a, program + (int64_t)i * PROGRAM_SLOTS + 1, sizeof a);
        a[op_rows_arg[op]] = rows;
        int rc;
        switch (op) {
            case OP_GATHER:
                rc = llmctl_gather_rows(P(0), a[1], a[2], P(3), I(4), P(5));
                break;
            case OP_RMS_NORM:
                rc = llmctl_rms_norm(I(0), P(1), a[2], P(3), a[4], P(5), a[6], P(7), P(8), a[9], I(10), I(11),
                                     bits_to_float(a[12]), num_threads);
                break;
            case OP_GEMM:
                rc = llmctl_gemm_bf16(P(0), a[1], I(2), I(3), P(4), I(5), P(6), P(7), a[8], num_threads);
                break;
            case OP_GEMM_SILU:
                rc = llmctl_gemm_bf16_silu(P(0), a[1], I(2), I(3), P(4), I(5), P(6), P(7), a[8], num_threads);
                break;
            case OP_ROTARY:
                rc = llmctl_rotary(I(0), P(1), I(2), P(3), I(4), a[5], P(6), a[7], P(8), a[9], I(10), I(11), I(12),
                                   num_threads);
                break;
            case OP_WRITE_KV:
                rc = llmctl_write_kv(I(0), P(1), a[2], P(3), a[4], P(5), P(6), P(7), I(8), I(9), a[10], num_threads);
                break;
            case OP_DECODE_ATTENTION:
                rc = llmctl_decode_attention(I(0), P(1), a[2], P(3), a[4], P(5), P(6), I(7), I(8), I(9), I(10), P(11),
                                             a[12], P(13), P(14), P(15), I(16), I(17), bits_to_float(a[18]), a[19],
                                             num_threads);
                break;
            case OP_GEMM_F32:
                rc = llmctl_gemm_f32(P(0), a[1], I(2), I(3), P(4), I(5), P(6), P(7), a[8], num_threads);
                break;
            case OP_WRITE_KV8:
                rc = llmctl_write_kv8(I(0), I(1), P(2), a[3], P(4), a[5], P(6), P(7), P(8), I(9), I(10), I(11), a[12],
                                      num_threads);
                break;
            case OP_DECODE_ATTENTION_KV8:
                rc = llmctl_decode_attention_kv8(I(0), I(1), P(2), a[3], P(4), a[5], P(6), P(7), I(8), I(9), I(10),
                                                 I(11), P(12), a[13], P(14), P(15), P(16), I(17), I(18),
                                                 bits_to_float(a[19]), a[20], num_threads);
                break;
            case OP_DECODE_ATTENTION_CAPPED:
                rc = llmctl_decode_attention_capped(I(0), P(1), a[2], P(3), a[4], P(5), P(6), I(7), I(8), I(9), I(10),
                                                    P(11), a[12], P(13), P(14), P(15), I(16), I(17), P(18), a[19],
                                                    num_threads);
                break;
            case OP_QUANT_GEMM_WQ: {
                /* llmctl_gemm_wq_panels (float32 x and y) or its bf16 twin: the same argument list */
                typedef int (*gemm_wq_fn)(const void *, int64_t, int64_t, const void *, int, const float *,
                                          const float *, int64_t, const float *, int64_t, void *);
                rc = ((gemm_wq_fn)P(0))(P(1), a[2], a[3], P(4), I(5), P(6), P(7), a[8], P(9), a[10], P(11));
                break;
            }
            case OP_SILU_AND_MUL:
                rc = llmctl_silu_and_mul(I(0), P(1), a[2], P(3), a[4], I(5), I(6), num_threads);
                break;
            default: /* in the table but not handled here */
                rc = -2;
        }
        const int ok = rc == 0;
        if (program_timing) {
            const int64_t t = now_ns();
            program_ns[op] += t - t_prev;
            t_prev = t;
        }
        if (!ok) {
            *code = rc;
            return i + 1;
        }
    }
    return 0;
}
#undef P
#undef I
