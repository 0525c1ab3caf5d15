/* llmctl CPU kernels: the few ops where a torch composition costs more in dispatch and copies than in math.
 *
 * Plain C compiled on the host that runs it (gcc/clang -O3 -march=native), loaded through ctypes, so there is
 * no build step at install time and no dependency on torch's C++ headers. Every function takes raw pointers,
 * element strides and a dtype code; the Python side (llmctl_cpu.native) checks shapes, dtypes and contiguity
 * before calling, so nothing here validates twice.
 *
 * Batch invariance: each (sequence, kv head) pair of a decode is computed by one thread from that sequence's
 * data alone, in a fixed order, so a row's result never depends on the rest of the batch or the thread count.
 * The file is compiled with -ffp-contract=off so the rotary kernel rounds exactly where torch's reference does;
 * the attention kernel asks for fused multiply-adds explicitly where it wants them.
 */

/* The kernels live in native/kernels/, one file per family, and are compiled here as one translation unit (a
 * unity build): the static helpers of common.h are shared, the compiler inlines across families, and the exported
 * symbols (llmctl_*) keep their names. To add a family, add its file to native/kernels/ and its #include below;
 * the Python side hashes every file there into the build's cache key. */
#include "kernels/common.h"

#include "kernels/attention_decode.c"
#include "kernels/rowwise.c"
#include "kernels/lora.c"
#include "kernels/gemm_bf16.c"
#include "kernels/gemm_f32.c"
#include "kernels/moe.c"
#include "kernels/argmax.c"
#include "kernels/logprobs.c"
#include "kernels/sample.c"
#include "kernels/attention_prefill.c"
#include "kernels/attention_kv8.c"
#include "kernels/program.c"
