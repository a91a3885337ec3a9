"""Compression outputs and metrics of time-varying volume INRs (MoE-INR): the fp16 weights artifact,
compression ratios, decompression, PSNR / SSIM / chamfer distance / uncertainty metrics, and error-bounded
compressors (SZ3, ZFP; optional packages) matched to a target PSNR. See compress/moe_eval.py."""
