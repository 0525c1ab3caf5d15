/* The replay program's ABI, declared once. C builds its opcodes, row-count slots and success codes from this table,
 * and llmctl_cpu.native reads the same lines (the X(...) rows below) to record calls, so neither side keeps
 * positions in step by hand.
 *
 * A record is PROGRAM_SLOTS int64 words: the opcode, then the kernel's arguments in its own order (pointers as
 * addresses, floats as their bits), except its last argument, the thread count, which the replaying call gives.
 * Per kernel:  X(NAME, opcode, recorded kernel, NativeKernels attribute, argument that carries the row count
 * (replaced at replay by the program's own row count), argument passed as float bits (-1: none)). Every kernel
 * returns 0 on success (common.h), so the table needs no success column. Opcodes run 1..n without gaps.
 * QUANT_GEMM_WQ is quant.c's weight-only panel GEMM, a separate library: its record's first word is the address of
 * llmctl_gemm_wq_panels (or of its bf16 twin), then that function's arguments (the row count second). */
#ifndef LLMCTL_CPU_PROGRAM_ABI_H
#define LLMCTL_CPU_PROGRAM_ABI_H

#define PROGRAM_SLOTS 24

#define PROGRAM_OPS(X)                                                   \
    X(GATHER, 1, gather_rows, _gather, 4, -1)                        \
    X(RMS_NORM, 2, rms_norm, _norm, 10, 12)                           \
    X(GEMM, 3, gemm_bf16, _gemm, 2, -1)                               \
    X(GEMM_SILU, 4, gemm_bf16_silu, _gemm_silu, 2, -1)                \
    X(ROTARY, 5, rotary, _rotary, 2, -1)                             \
    X(WRITE_KV, 6, write_kv, _write, 8, -1)                          \
    X(DECODE_ATTENTION, 7, decode_attention, _attn, 16, 18)           \
    X(GEMM_F32, 8, gemm_f32, _gemm_f32, 2, -1)                        \
    X(WRITE_KV8, 9, write_kv8, _write8, 9, -1)                       \
    X(DECODE_ATTENTION_KV8, 10, decode_attention_kv8, _attn8, 17, 19) \
    X(DECODE_ATTENTION_CAPPED, 11, decode_attention_capped, _attn_cap, 16, -1) \
    X(QUANT_GEMM_WQ, 12, gemm_wq_panels, _quant_wq, 2, -1)          \
    X(SILU_AND_MUL, 13, silu_and_mul, _silu_mul, 5, -1)

#endif /* LLMCTL_CPU_PROGRAM_ABI_H */
