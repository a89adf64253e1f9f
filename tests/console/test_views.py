"""What the console's pages say, as plain data: whether a model fits, how variants group, failures
in words."""

from __future__ import annotations

from pendra_api.console import views
from pendra_shared.catalogue import CatalogueEntry
from pendra_shared.jobs import ERROR_CODES, Job, JobState

GB = 1000**3
SHA = "0" * 64
CPU = {
    "memory_budget_bytes": 16 * GB,
    "gpu_offload": False,
    "devices": [{"type": "cpu", "memory_total": 24 * GB}],
}
GPU = {
    "memory_budget_bytes": 96 * GB,
    "gpu_offload": True,
    "devices": [{"type": "gpu", "memory_total": 24 * GB}, {"type": "gpu", "memory_total": 24 * GB}],
}


def entry(name: str, size: int | None, **facts: object) -> CatalogueEntry:
    return CatalogueEntry(
        name=name,
        purpose="chat",
        gguf_url="https://example.org/m.gguf",
        gguf_sha256=SHA,
        size_bytes=size,
        **facts,
    )


def test_fit_is_judged_against_the_budget_with_room_for_the_context() -> None:
    assert views.fit_for(4 * GB, CPU).level == "fits"
    assert views.fit_for(12 * GB, CPU).level == "tight"  # 14.4 GB with its cache, of 16 GB
    assert views.fit_for(14 * GB, CPU).level == "too_big"  # 16.8 GB
    assert views.fit_for(14 * GB, CPU).text == "Too big: needs about 16.8 GB of 16.0 GB memory budget"
    assert views.fit_for(100 * 1000**2, CPU).text.startswith("Fits: needs about 167.1 MB")  # 64 MiB at least


def test_a_hybrid_models_states_count_in_its_fit() -> None:
    from pendra_shared.catalogue import bundled_entries

    qwen = {e.name: e for e in bundled_entries()}["qwen3.6:27b"]
    assert qwen.state_bytes == 48 * (3 * (6144 + 2 * 16 * 128) + 128 * 6144) * 4  # 149.6 MiB
    plain = views.fit_for(qwen.size_bytes, GPU)
    hybrid = views.fit_for(qwen.size_bytes, GPU, qwen.state_bytes)
    assert plain.text == "Fits: needs about 20.2 GB of 48.0 GB GPU memory"
    assert hybrid.text == "Fits: needs about 21.1 GB of 48.0 GB GPU memory"  # 6 states of 157 MB more


def test_with_a_gpu_the_gpus_memory_is_the_limit() -> None:
    assert views.fit_for(33 * GB, GPU).text == "Fits, tightly: needs about 39.6 GB of 48.0 GB GPU memory"
    assert views.fit_for(45 * GB, GPU).level == "too_big"  # fits the 96 GB budget, not the GPUs
    assert "GPU memory" not in views.fit_for(30 * GB, {**GPU, "gpu_offload": False}).text


def test_fit_is_unknown_without_a_size_or_a_status() -> None:
    assert views.fit_for(None, CPU).level == "unknown"
    unknown = views.fit_for(GB, None)
    assert unknown.level == "unknown" and "not answering" in unknown.text


def test_variants_group_by_family_smallest_first_with_their_latest_job() -> None:
    entries = [
        entry("qwen3:8b", 5 * GB, description="Qwen 3", license="apache-2.0"),
        entry("llama3.2:3b", 2 * GB),
        entry("qwen3:0.6b", GB // 2, default=True, description="Qwen 3, default", license="apache-2.0"),
        entry("qwen3:unknown", None),
    ]
    old = Job.new("qwen3:8b").finished(JobState.FAILED, error_code="checksum_mismatch")
    new = Job.new("qwen3:8b").moved(state=JobState.RUNNING)
    families = views.group(entries, {"llama3.2:3b"}, [old, new], CPU)
    assert [f.name for f in families] == ["qwen3", "llama3.2"]
    qwen = families[0]
    assert [v.name for v in qwen.variants] == ["qwen3:0.6b", "qwen3:8b", "qwen3:unknown"]
    assert qwen.description == "Qwen 3, default"  # the default variant speaks for the family
    assert qwen.license == "apache-2.0"
    assert qwen.variants[1].active and not qwen.variants[1].failed
    assert families[1].variants[0].installed and families[1].installed == 1


def test_a_failed_job_is_shown_until_the_model_is_installed() -> None:
    failed = Job.new("qwen3:8b").finished(JobState.FAILED, error_code="disk_full")
    (family,) = views.group([entry("qwen3:8b", GB)], set(), [failed], CPU)
    assert family.variants[0].failed
    (family,) = views.group([entry("qwen3:8b", GB)], {"qwen3:8b"}, [failed], CPU)
    assert not family.variants[0].failed


def test_every_install_error_code_has_words() -> None:
    codes = {code for _kind, code in ERROR_CODES} | {"internal_error", "job_lost"}
    assert codes <= set(views.FAILURE_WORDS)
    unknown = Job.new("x:1").finished(JobState.FAILED, error_code="something_new")
    assert views.failure_words(unknown) == views.FAILURE_WORDS["install_failed"]


def test_sizes_read_as_people_read_them() -> None:
    assert views.human_bytes(None) == "?"
    assert views.human_bytes(999) == "999 B"
    assert views.human_bytes(253_113_024) == "253.1 MB"
    assert views.human_bytes(42 * 1000**4) == "42.0 TB"
