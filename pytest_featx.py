"""The featx pytest plugin (``pytest11`` entry point ``featx``): ``pytest --featx-configs DIR`` checks configs.

Each config found under DIR (as ``featx check`` finds them) is one test item, marked ``featx``, which passes when every cut
the config declares is faithful and fails with ``ConfigCheck.message()``: the lost glue, where, and the
max diff, then the numeric environment it was checked in (each of its keys also a ``user_properties`` entry,
which ``--junitxml`` writes as a ``<property>``). A path with no config, or a config that cannot be checked, is a failing item too.

Every pytest run in an environment with featx loads this module, so it lives outside the ``featx``
package (whose import pulls in torch, torchvision and timm: seconds) and imports featx only when
``--featx-configs`` is given.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("featx", "featx: truncated backbones that must match their full models")
    group.addoption(
        "--featx-configs",
        action="append",
        default=[],
        metavar="DIR",
        help="check every featx backbone config under DIR (or this file) as one test item each; repeatable",
    )
    group.addoption(
        "--featx-device",
        default="cpu",
        metavar="DEVICE",
        help="torch device for --featx-configs (default: cpu)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "featx: a featx backbone config checked by --featx-configs")


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselection, which runs in this same hook
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    paths = config.getoption("featx_configs")
    if not paths:
        return
    from featx.checks import discover
    from featx.devices import torch_device
    from featx.errors import FeatxError

    try:  # the run's error, said once as the command line says it, not every config's
        torch_device(config.getoption("featx_device"), "--featx-device")
    except FeatxError as err:
        raise pytest.UsageError(str(err)) from None

    for path, error in discover(paths):
        resolved = Path(path).resolve()
        try:  # node ids relative to the rootdir, as pytest's own; absolute outside it, so never two alike
            nodeid = resolved.relative_to(config.rootpath).as_posix()
        except ValueError:
            nodeid = resolved.as_posix()
        parent = ConfigFile.from_parent(session, path=resolved, nodeid=nodeid)
        item = ConfigItem.from_parent(parent, name="faithful", config_path=path, error=error)
        item.add_marker("featx")  # `-m featx` runs the configs alone
        items.append(item)
        # as if collected: the terminal's "collected N items" and other plugins' counts include it
        config.hook.pytest_collectreport(report=pytest.CollectReport(parent.nodeid, "passed", None, [item]))


class ConfigFile(pytest.File):
    """The config file an item belongs to; its items are made by the hook above, not collected."""

    def collect(self) -> list:
        return []


class ConfigItem(pytest.Item):
    def __init__(self, *, config_path: str, error: str | None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.config_path = config_path
        self.error = error

    def runtest(self) -> None:
        from featx.checks import ConfigCheck, check_config

        if self.error is not None:
            result = ConfigCheck(self.config_path, error=self.error)
        else:
            result = check_config(self.config_path, device=self.config.getoption("featx_device"))
        # the numeric environment of the check, as `featx check --junit` writes it: `--junitxml` shows
        # each key as a <property> of the test case
        self.user_properties.extend(result.environment.items())
        if not result.faithful:
            from featx.render.text import environment_lines

            raise ConfigNotFaithful("\n".join([result.message(), *environment_lines(result.environment)]))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: str | None = None) -> str:
        if isinstance(excinfo.value, ConfigNotFaithful):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"featx check {self.config_path}"


class ConfigNotFaithful(Exception):
    """A config whose declared cuts are not all faithful, or that could not be checked."""
