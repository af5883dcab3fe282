"""Every numerical tolerance of the test suite, in one table (DESIGN §6)."""

# float32 engine against the float64 reference: max |diff| ≤ RTOL_F32 × max |reference| (per layer)
RTOL_F32 = 1e-5
# float32 probabilities (attention, F and its baselines) against float64: RTOL_F32 of their scale, 1 (a 6-layer
# MiniLM's baselines differ by up to 2.1e-6 on an AVX-512 CPU)
PROB_ATOL_F32 = 1e-5
# adapters against transformers' own model, float32 logits
ADAPTER_ATOL = 1e-5
# bf16 / fp16: error against float64 at most this factor times plain torch's error in that dtype
LOW_PRECISION_FACTOR = 2.0
# completeness with gausslegendre 8 nodes on MiniLM: |delta| ≤ REL × |F(A) − F(0)| + ABS
COMPLETENESS_REL = 1e-3
COMPLETENESS_ABS = 1e-6
# Triton kernel, bf16 / fp16 inputs: Ḡ split into two 16-bit parts keeps Ḡ Vᵀ near float32 (vs float64, relative)
KERNEL_LOW_PRECISION_RTOL = 1e-4
