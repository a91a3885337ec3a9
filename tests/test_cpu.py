"""util/cpu.py: bf16 support read from /proc/cpuinfo texts (Intel with AMX, AMD EPYC with AVX512-BF16, an
AVX2-only CPU, an ARM board), and a clean fallback ("unknown", no error) when the file is absent or has no flags."""
import util.cpu as cpu

XEON_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512vnni
"""
AVX2 = """processor\t: 0
model name\t: Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz
flags\t\t: fpu sse sse2 avx avx2 fma
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16 i8mm
CPU implementer\t: 0x41
"""


def test_parse_cpuinfo_kinds():
    amx = cpu.parse_cpuinfo(XEON_AMX)
    assert amx["bf16"] == "amx_bf16" and amx["avx512_bf16"] and amx["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    epyc = cpu.parse_cpuinfo(EPYC)
    assert epyc["bf16"] == "avx512_bf16" and not epyc["amx_bf16"] and epyc["model"].startswith("AMD EPYC")
    assert cpu.parse_cpuinfo(AVX2)["bf16"] == "none"
    arm = cpu.parse_cpuinfo(ARM)                         # a flags line without the x86 names: none
    assert arm["bf16"] == "none" and arm["model"] == ""
    # amx_bf16 without the tile flag (a kernel that disabled AMX state): not usable
    assert cpu.parse_cpuinfo(XEON_AMX.replace(" amx_tile", ""))["bf16"] == "avx512_bf16"


def test_fallback_without_cpuinfo(tmp_path):
    for text in ("", "processor : 0\nmodel name : x\n"):  # empty, or no flags line
        assert cpu.parse_cpuinfo(text)["bf16"] == "unknown"
    f = cpu.cpu_features(str(tmp_path / "absent"))
    assert f["bf16"] == "unknown" and f["source"].startswith("unreadable") and f["cores"] >= 1
    assert "bf16: unknown" in cpu.describe(f)
    (tmp_path / "cpuinfo").write_text(EPYC)
    f = cpu.cpu_features(str(tmp_path / "cpuinfo"))
    assert f["bf16"] == "avx512_bf16" and f["source"] == str(tmp_path / "cpuinfo")
    assert cpu.cpu_features()["bf16"] in cpu.KINDS     # this machine: whatever it is, one of the kinds


def test_tune_malloc_once_and_only_where_asked(monkeypatch):
    """tune_malloc sets glibc's thresholds once per process (where the C library is glibc), says so in one line,
    and leaves the allocator alone where DRR_MALLOC=default or the user's own MALLOC_*_ variables are set."""
    import platform

    for k in ("DRR_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(cpu, "_malloc_state", {})
    calls = []
    monkeypatch.setattr(cpu, "_mallopt_thresholds", lambda: calls.append(1) or "tuned")
    assert cpu.tune_malloc() == "tuned" and cpu.tune_malloc() == "tuned" and calls == [1]   # once
    monkeypatch.setattr(cpu, "_malloc_state", {})
    monkeypatch.setenv("DRR_MALLOC", "default")
    assert "defaults" in cpu.tune_malloc() and calls == [1]
    monkeypatch.setattr(cpu, "_malloc_state", {})
    monkeypatch.delenv("DRR_MALLOC")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert "environment" in cpu.tune_malloc() and calls == [1]
    monkeypatch.undo()
    state = cpu._mallopt_thresholds()                  # the real call on this machine
    if platform.system() == "Linux" and platform.libc_ver()[0].startswith("glibc"):
        assert state.startswith("glibc mmap threshold 32 MiB, trim threshold 256 MiB"), state
    else:
        assert "unchanged" in state or "defaults" in state, state
