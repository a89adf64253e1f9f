from __future__ import annotations

from pathlib import Path, PureWindowsPath

import pytest
from pendra_shared.config import (
    default_cache_dir,
    default_models_dir,
    describe_settings,
    load_settings,
    split_locations,
)
from pendra_shared.errors import ConfigError


def test_unix_default_is_under_home(isolated_env: Path) -> None:
    assert load_settings().models_dir == isolated_env / ".pendra" / "models"
    assert default_models_dir(platform="linux") == isolated_env / ".pendra" / "models"
    assert default_models_dir(platform="darwin") == isolated_env / ".pendra" / "models"


def test_the_cache_is_the_users_cache_on_each_system(isolated_env: Path) -> None:
    assert load_settings().cache_dir == isolated_env / ".cache" / "pendra"
    assert default_cache_dir(platform="linux", environ={"XDG_CACHE_HOME": "/var/tmp/c"}) == Path(
        "/var/tmp/c/pendra"
    )
    # A relative XDG_CACHE_HOME is invalid by the spec and ignored.
    assert (
        default_cache_dir(platform="linux", environ={"XDG_CACHE_HOME": "c"})
        == isolated_env / ".cache" / "pendra"
    )
    assert default_cache_dir(platform="darwin", environ={}) == isolated_env / "Library" / "Caches" / "Pendra"
    windows = default_cache_dir(platform="win32", environ={"LOCALAPPDATA": r"D:\Users\me\AppData\Local"})
    assert PureWindowsPath(str(windows)) == PureWindowsPath(r"D:\Users\me\AppData\Local\Pendra\cache")
    assert load_settings(cache_dir="~/elsewhere").cache_dir == isolated_env / "elsewhere"


def test_windows_default_is_programdata() -> None:
    path = default_models_dir(platform="win32", environ={"ProgramData": r"D:\Data"})
    assert PureWindowsPath(str(path)) == PureWindowsPath(r"D:\Data\Pendra\models")
    fallback = default_models_dir(platform="win32", environ={})
    assert PureWindowsPath(str(fallback)) == PureWindowsPath(r"C:\ProgramData\Pendra\models")


def test_windows_default_through_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.platform", "win32")
    monkeypatch.setenv("ProgramData", r"E:\PD")
    assert PureWindowsPath(str(load_settings().models_dir)) == PureWindowsPath(r"E:\PD\Pendra\models")


def test_env_beats_file_beats_default(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = isolated_env / ".pendra" / "config.toml"
    config.parent.mkdir()
    config.write_text(f'models_dir = "{tmp_path / "from-file"}"\ndownload_retries = 2\n')
    settings = load_settings()
    assert settings.models_dir == tmp_path / "from-file"
    assert settings.download_retries == 2

    monkeypatch.setenv("PENDRA_MODELS_DIR", str(tmp_path / "from-env"))
    settings = load_settings()
    assert settings.models_dir == tmp_path / "from-env"
    sources = {r.name: r.source for r in describe_settings(settings)}
    assert sources["models_dir"] == "env PENDRA_MODELS_DIR"
    assert sources["download_retries"] == f"file {config}"
    assert sources["download_timeout_s"] == "default"


def test_pendra_config_points_at_another_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "elsewhere.toml"
    config.write_text('models_dir = "~/custom-store"\n')
    monkeypatch.setenv("PENDRA_CONFIG", str(config))
    assert load_settings().models_dir == Path.home() / "custom-store"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("models_dir = [unclosed", "not valid TOML"),
        ('modelsdir = "/x"\n', r"unknown setting\(s\) modelsdir"),
        ("download_retries = -3\n", "download_retries"),
    ],
)
def test_bad_config_file_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(content)
    monkeypatch.setenv("PENDRA_CONFIG", str(config))
    with pytest.raises(ConfigError, match=message):
        load_settings()


def test_bad_env_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PENDRA_DOWNLOAD_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError, match="download_timeout_s"):
        load_settings()


def test_catalogue_list_keeps_urls_whole() -> None:
    value = "/a/one.yaml:https://example.test/c.yaml:file:///b/two.json::"
    assert split_locations(value, ":") == [
        "/a/one.yaml",
        "https://example.test/c.yaml",
        "file:///b/two.json",
    ]
    assert split_locations(r"C:\a.yaml;https://x.test/c.yaml", ";") == [
        r"C:\a.yaml",
        "https://x.test/c.yaml",
    ]


def test_every_setting_is_documented() -> None:
    from pendra_shared.config import Settings

    root = Path(__file__).resolve().parents[2]
    example = (root / ".env.example").read_text()
    readme = (root / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        variable = "PENDRA_" + name.upper()
        assert f"# {variable}=" in example, variable
        assert f"| `{variable}` |" in readme, variable
        assert field.description, name


def test_pendra_config_never_prints_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import run_cli

    secrets = {
        "PENDRA_API_KEYS": "key-aaa,key-bbb",
        "PENDRA_API_KEY": "key-ccc",
        "PENDRA_MIRROR_SECRET_KEY": "mirror-ddd",
        "PENDRA_REDIS_URL": "redis://:pass-eee@redis:6379/0",
    }
    for flag in ([], ["--json"]):
        result = run_cli("config", *flag, env=secrets)
        assert result.returncode == 0, result.stderr
        for secret in ("key-aaa", "key-bbb", "key-ccc", "mirror-ddd", "pass-eee"):
            assert secret not in result.stdout
        assert "redis://:***@redis:6379/0" in result.stdout
