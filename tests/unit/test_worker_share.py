"""What each process of `imgsvc worker --processes N` gets of the worker's budgets: the
bytes divided (their sum never above the setting), the counts divided rounding up."""

from __future__ import annotations

from imgsvc import settings, supervisor

MIB = 1024 * 1024


def test_one_process_keeps_the_settings_as_they_are() -> None:
    config = settings.from_env({})
    assert supervisor.share(config, 1) is config


def test_four_processes_share_the_memory_budgets_and_the_counts() -> None:
    config = settings.from_env(
        {
            "IMGSVC_IMAGE_MEMORY_MB": "512",
            "IMGSVC_SOURCE_MEMORY_MB": "16",
            "IMGSVC_DOWNLOAD_CONCURRENCY": "16",
            "IMGSVC_IMAGE_CONCURRENCY": "5",
            "IMGSVC_LARGE_IMAGE_CONCURRENCY": "2",
            "IMGSVC_WORKER_CONCURRENCY": "8",
        }
    )
    each = supervisor.share(config, 4)
    assert each.image_memory == 128 * MIB and 4 * each.image_memory <= config.image_memory
    assert each.source_memory == 4 * MIB
    assert each.download_concurrency == 4
    assert each.image_concurrency == 2  # 5/4, rounded up
    assert each.large_image_concurrency == 1  # never 0
    assert each.worker_concurrency == 2
    assert each.max_image_bytes == config.max_image_bytes  # a limit per image, not a budget


def test_no_limit_stays_no_limit() -> None:
    config = settings.from_env({"IMGSVC_IMAGE_MEMORY_MB": "0", "IMGSVC_SOURCE_MEMORY_MB": "0"})
    each = supervisor.share(config, 3)
    assert each.image_memory == 0 and each.source_memory == 0


def test_one_process_for_two_usable_cores_rounded_up() -> None:
    assert [supervisor.default_processes(n) for n in (1, 2, 3, 4, 16)] == [1, 1, 2, 2, 8]
