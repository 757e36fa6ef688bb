"""The CPU flag choice: YNNPACK off only without AVX-512, and never over the user's choice."""
import os

from ldm_jax import xla_cpu


def _cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
    return str(path)


def test_detects_avx512(tmp_path):
    assert xla_cpu.cpu_has_avx512(_cpuinfo(tmp_path, "avx2 avx512f avx512bw"))
    assert not xla_cpu.cpu_has_avx512(_cpuinfo(tmp_path, "avx avx2 fma"))
    assert not xla_cpu.cpu_has_avx512(str(tmp_path / "missing"))


def test_flag_added_without_avx512_and_kept_from_user(monkeypatch):
    monkeypatch.setattr(xla_cpu, "cpu_has_avx512", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    xla_cpu.use_fast_cpu_flags()
    assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                       "--xla_cpu_experimental_ynn_fusion_type=")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT")
    xla_cpu.use_fast_cpu_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"


def test_flag_not_added_with_avx512(monkeypatch):
    monkeypatch.setattr(xla_cpu, "cpu_has_avx512", lambda: True)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    xla_cpu.use_fast_cpu_flags()
    assert "XLA_FLAGS" not in os.environ
