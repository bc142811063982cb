"""The run settings tree (engine/settings.py) is what the operator is shown and held to:
every writing command's option has the tree's default and bounds in its ``--help``, and a
value out of bounds is refused alike by the option and by ``toolkit control set``."""

from __future__ import annotations

import re

import click
from helpers import toolkit

from toolkit.cli.main import cli
from toolkit.engine.settings import DEFAULT_TARGET_BATCH_MS, SETTABLE, Entry, entries

# The defaults --help shows in words: each names what the tree's None (or the CLI's) means.
IN_WORDS = {"batch-size": "adaptive", "target-batch-ms": f"{DEFAULT_TARGET_BATCH_MS} without --batch-size"}


def _flat(text: str) -> str:
    return " ".join(text.split())


def _expected_bounds(entry: Entry) -> str | None:
    b = entry.spec.bound
    if b.kind == "whole":
        return f"{int(b.low):,} to {int(b.high):,}{b.unit}"
    if b.kind == "seconds":
        return f"{b.low:g} to {int(b.high):,} s"
    if b.kind == "rate":
        return f"{b.low:g} to {int(b.high):,} MB/s"
    return None


def _out_of_bounds(entry: Entry) -> str:
    b = entry.spec.bound
    return str(int(b.high) + 1) if b.kind == "whole" else repr(float(b.high) * 2)


def test_every_run_option_shows_the_trees_default_and_bounds():
    for command in ("migrate", "rollback"):
        shown = _flat(CliRunnerHelp.of(command).split("\nOptions:\n", 1)[1])
        ctx = click.Context(cli.commands[command], info_name=command)
        options = {p.name: p for p in cli.commands[command].params}
        for entry in entries():
            if entry.spec.only not in (None, command):
                assert f"--{entry.spec.key}" not in shown, (command, entry.spec.key)
                continue
            option = options[entry.name]
            assert option.opts == [f"--{entry.spec.key}"], entry
            if entry.spec.bound.kind == "flag":
                assert option.is_flag and option.default is False and entry.default is False
                continue
            if entry.spec.key != "batch-size":  # not given: adaptive, from the tree's start size
                assert option.default == entry.default, (command, entry.spec.key)
            words = IN_WORDS.get(entry.spec.key)
            default = words or (str(entry.default) if entry.default is not None else None)
            said = _flat(option.get_help_record(ctx)[1])
            assert said in shown, (command, entry.spec.key)  # what --help shows, as Click words it
            block = said.rsplit("]", 1)[0]
            if default is not None:
                assert f"[default: {default}" in block, (command, entry.spec.key, block)
            else:
                assert re.search(r"\[default: (no limit|none)", block), (command, entry.spec.key)
            bounds = _expected_bounds(entry)
            if bounds is not None:
                assert block.endswith(f"; {bounds}"), (command, entry.spec.key, block)
                kind = option.type
                assert kind.convert(str(entry.spec.bound.high), option, None) is not None
                for bad in (_out_of_bounds(entry), str(entry.spec.bound.low - 1)):
                    try:
                        kind.convert(bad, option, None)
                    except click.BadParameter:
                        continue
                    raise AssertionError(f"--{entry.spec.key}={bad} was taken")


def test_the_help_speaks_of_the_trees_numbers():
    """The numbers the help texts speak of are the tree's (the start size, the sizing range,
    the DDL backoff), not copies."""
    shown = _flat(CliRunnerHelp.of("migrate"))
    assert "batches start at 1000 keys and adapt" in shown
    assert "(x0.5 to x2 each time, 100 to 50000 keys)" in shown
    assert "(backoff up to 5 s)" in shown
    assert "waiting 1 s, 2 s, 4 s ... (at most 30 s)" in shown


def test_a_value_out_of_bounds_is_refused_alike_by_the_option_and_control_set(realistic_db):
    assert SETTABLE, "no setting a running run can change"
    for key, entry in SETTABLE.items():
        for bad in (_out_of_bounds(entry), str(entry.spec.bound.low - 1)):
            option = toolkit(realistic_db, "migrate", "milestone-1", f"--{key}={bad}")
            setting = toolkit(realistic_db, "control", "set", f"{key}={bad}")
            assert option.exit_code == 2 and setting.exit_code == 2, (key, option.output, setting.output)
            said_option = option.output.split(f"Invalid value for '--{key}': ", 1)[1].split(". Next:")[0]
            said_setting = setting.output.split(f"control set {key}: ", 1)[1].split(". Next:")[0]
            assert said_option == said_setting, (key, said_option, said_setting)
    # nothing connected to write: no toolkit schema, no request stored
    assert realistic_db.scalar("SELECT to_regnamespace('toolkit')") is None


class CliRunnerHelp:
    @staticmethod
    def of(command: str) -> str:
        from click.testing import CliRunner

        result = CliRunner().invoke(cli, [command, "--help"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output


def test_a_limit_set_while_running_is_the_throttles_at_once():
    """The throttle's limits are the run's options, the same object: `control set` changes
    the value both read, with nothing copied between them."""
    from toolkit.engine.budget import Budget
    from toolkit.engine.control import Steering
    from toolkit.engine.settings import RunOptions
    from toolkit.engine.throttle import Throttle

    options = RunOptions()
    budget = Budget(options)
    budget.throttle = Throttle(None, options, budget)  # no engine: nothing is read here
    steering = Steering(None, 1, options, budget)
    who = {"reason": None, "db_user": "dba", "os_user": "alice", "host": "ops-1"}
    for n, (key, value) in enumerate([("max-replica-lag-ms", "200"), ("max-throttle-s", "0.5"),
                                      ("max-wal-rate", "2.5")], start=1):
        steering._act({"id": n, "action": "set", "key": key, "value": value, **who})
    assert budget.throttle.limits.max_replica_lag_ms == 200 == options.max_replica_lag_ms
    assert budget.throttle.limits.max_throttle_s == 0.5
    assert budget.throttle.wal is not None and budget.throttle.wal.limit_mb_s == 2.5
    assert [t["before"] for t in steering.taken] == [1500, None, None]
