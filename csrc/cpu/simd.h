// Function multiversioning for the CPU kernels: a function marked VLSSM_CLONES
// is compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline,
// with every callee inlined into each clone (flatten), and the dynamic loader
// picks the best clone for the running CPU. Other targets get one plain build.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(VLSSM_NO_CLONES)
#define VLSSM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define VLSSM_CLONES
#endif
