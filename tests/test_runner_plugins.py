"""Plugging in-process runners in (issue 6 item 1): by name through the `steerway.runners`
entry-point group or as module:attr, with per-runner options from a TOML file or the
environment; what a run's context holds."""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Settings
from gateway.core.ids import now_ms
from gateway.runners.echo import EchoRunner
from gateway.runners.options import load_options
from gateway.runners.registry import build_registry, make_runner, open_runners
from tests.conftest import run_gateway
from tests.helpers import END, Fed, ack_of, completed, expect, run_completed
from tests.test_runs_ws import start

PLUGIN = """
from gateway.runners.base import completed, delta, run_completed


class Shout:
    name = "shout"
    supports_steering = False

    def __init__(self, suffix="!"):
        self.suffix = suffix

    async def run(self, ctx):
        text = " ".join(t.text for t in ctx.triggers).upper() + self.suffix
        yield delta(text)
        yield completed(text)
        yield run_completed()


shout = Shout("?")
"""


@pytest.fixture
def plugin_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed distribution (a dist-info on sys.path) with two `steerway.runners`
    entry points: one good, one whose module does not exist."""
    (tmp_path / "shout_plugin.py").write_text(PLUGIN)
    info = tmp_path / "shout_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[steerway.runners]\nshout = shout_plugin:Shout\nbroken = no_such_module:Runner\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("shout_plugin", None)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_options_from_a_file_and_the_environment(tmp_path: Path) -> None:
    config = write(
        tmp_path / "runners.toml",
        """
        [runners.gpt]
        use = "openai"
        model = "small"
        deadline_s = 600

        [runners."far-away.v2"]
        supports_steering = false
        """,
    )
    env = {
        "STEERWAY_RUNNERS__GPT__MODEL": "large",  # the environment wins
        "STEERWAY_RUNNERS__FAR_AWAY_V2__LEFTOVER_STEERING": "drop",
        "STEERWAY_RUNNERS__NEW__IDLE_S": "5",
        "STEERWAY_RUNNER": "ignored: not a runner option",
    }
    options = load_options(config, env)
    assert options["gpt"].use == "openai"
    assert options["gpt"].deadline_s == 600
    assert options["gpt"].extra == {"model": "large"}
    assert options["far-away.v2"].supports_steering is False
    assert options["far-away.v2"].leftover_steering == "drop"
    assert options["new"].idle_s == 5.0


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[runners.x]\nleftover_steering = 'keep'\n", {}, "leftover_steering"),
        ("[runners.x]\ndeadline_s = -1\n", {}, "deadline_s"),
        ("[other]\n", {}, "only [runners.<name>]"),
        ("[runners]\nx = 1\n", {}, "must be a table"),
        ("not toml [", {}, "is not TOML"),
        ("", {"STEERWAY_RUNNERS__X": "1"}, "<NAME>__<OPTION>"),
        ("", {"STEERWAY_RUNNERS__X__IDLE_S": "soon"}, "idle_s"),
    ],
)
def test_bad_options_are_refused_clearly(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        load_options(write(tmp_path / "r.toml", text), env)


def test_entry_points_module_attr_and_options(
    plugin_dist: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = write(
        tmp_path / "runners.toml",
        """
        [runners.echo]
        leftover_steering = "drop"
        delay_ms = 7

        [runners.shout]
        suffix = "!!"
        idle_s = 9

        [runners.quiet]
        use = "shout_plugin:shout"
        supports_steering = true

        [runners.remote-only]
        supports_steering = false
        """,
    )
    with caplog.at_level(logging.ERROR, "steerway.runners"):
        registry, remote = build_registry(50, ["shout_plugin:Shout"], load_options(config, {}))
    assert "broken" in caplog.text  # logged and skipped: the gateway still starts
    echo = registry.local("echo")
    assert isinstance(echo, EchoRunner)
    assert (echo.delay, echo.leftover_steering) == (0.007, "drop")
    shout: Any = registry.local("shout")
    assert (shout.suffix, shout.idle_s, shout.supports_steering) == ("!!", 9, False)
    quiet: Any = registry.local("quiet")  # an instance, renamed, given its options
    assert (quiet.name, quiet.suffix, quiet.supports_steering) == ("quiet", "?", True)
    assert registry.local("broken") is None
    assert list(remote) == ["remote-only"]  # left to remote runners
    with pytest.raises(ValueError, match=r"not built in, not a steerway\.runners entry point"):
        make_runner("nothing-like-this")
    with pytest.raises(ValueError, match="takes no"):
        make_runner(
            "shout_plugin:shout", options=load_options(None, {"STEERWAY_RUNNERS__Q__X": "1"})["q"]
        )


def test_the_default_runner_may_be_a_remote_name() -> None:
    runners, _ = open_runners(Settings.load({"runner": "planner"}, environ={}))
    assert runners.local("planner") is None
    spec = runners.spec("planner")
    assert spec is not None
    assert spec.remote
    assert runners.spec("nobody") is None


async def test_a_plugin_runner_serves_a_conversation_by_name(plugin_dist: Path) -> None:
    registry, _ = build_registry(1, ["shout"])
    async with run_gateway(runners=[registry.local("shout")]) as gw, gw.connect("sh", after=0) as c:
        ack, started = await start(c, "hey you", "m1", runner="shout")
        assert started["runner"] == "shout"
        done = await expect(c, "message.completed", run_id=ack["run_id"])
        assert done["message"]["content"] == "HEY YOU!"


async def test_the_run_context() -> None:
    """Run and conversation ids, the transcript so far without the messages no run has
    taken yet, the trigger messages last, steering, the cancel signal, the deadline."""
    fed = Fed()
    async with run_gateway(runners=[fed]) as gw, gw.connect("ctx", after=0) as client:
        ack1, _ = await start(client, "first", "m1", runner="fed")
        first = await fed.contexts.get()
        assert (first.run_id, first.conversation_id, first.runner) == (ack1["run_id"], "ctx", "fed")
        assert [m.content for m in first.messages] == ["first"]
        assert [t.text for t in first.triggers] == ["first"]
        assert abs(first.deadline_ms - (now_ms() + 300_000)) < 10_000
        assert not first.cancelled.is_set()
        await client.message("queued", "m2", mode="queue")
        await ack_of(client, "m2")
        await client.message("steering", "m3")
        assert (await ack_of(client, "m3"))["route"] == "steer"
        fed.put(completed("reply one"), run_completed(), END)
        follow = await fed.contexts.get()  # the leftover steering's follow-up
        assert [t.text for t in follow.triggers] == ["steering"]
        assert [m.content for m in follow.messages] == ["first", "reply one", "steering"]
        fed.put(run_completed(), END)
        queued = await fed.contexts.get()
        assert [m.content for m in queued.messages] == ["first", "steering", "reply one", "queued"]
        await client.send({"type": "cancel"})
        await expect(client, "run.ended", run_id=queued.run_id)
        assert queued.cancelled.is_set()
