"""Every command of README.md runs as written, and does what the README says it does.

The README's fenced blocks are read by language tag:

- ``sh``/``bash``/``console``: commands. Each command (a line, or one part
  of a line joined by ``&&``) must match one entry of ``COMMANDS``, which
  says how it is covered; a command no entry matches fails the test, so no
  command lands in the README untested. Most are run here, in the README's
  order, as a reader would: long-running ones (``triows serve``,
  ``python3 -m nox -s cluster``) in the background, waited on until they
  answer and stopped with Ctrl-C (SIGINT to their process group) before the
  next one that listens starts; the commands after them run against them and
  their output is checked. The set-up a fresh machine needs once is not run
  here: ``.ci/run`` runs the README's test command (checked here against
  it), and the virtual environment with triows installed is the one this
  test runs in (nox's tests session: its ``bin`` first on ``PATH``).
- ``python``: run by tests/test_client_readme.py (checked here: it names
  the block's section).
- ``text``: a diagram, nothing to run.

The only change made to a command is the port: the README's 8000 (and the
cluster's 8001-8003) become free ports, so that the test runs beside others.
``triows serve`` without ``--bind`` gets it through ``TRIOWS_BIND``, the
cluster through its ``--port``/``--instance-ports`` flags. Commands run in a
temporary directory, except nox's, which run in the clone (they need its
noxfile) and outside the tests' virtual environment, as the README says.
Inline code in the prose that starts with ``curl`` or ``python3`` is a
command too (the SSE alternative, the contributors' fast loop).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jwt
import trio
from trio_websocket import open_websocket_url

from tests.brokers import require_broker
from tests.e2e import unique_exchange
from triows.process import free_port, wait_for_status

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
PYTHON_EXAMPLES_TEST = ROOT / "tests" / "test_client_readme.py"
VENV_BIN = Path(sys.prefix) / "bin"
README_PORT = 8000
CLUSTER_INSTANCES = 3
# Hang guards only. A nox session installs triows into its own virtualenv the
# first time (a minute or more on a fresh machine).
NOX_TIMEOUT = 600
START_TIMEOUT = 60
STOP_TIMEOUT = 60
OUTPUT_TIMEOUT = 30

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
INLINE_COMMAND = re.compile(r"(curl|python3) ")
SHELL_TAGS = {"sh": "sh", "bash": "bash", "console": "bash"}


@dataclass(frozen=True)
class Block:
    tag: str
    code: str
    line: int
    section: str

    @property
    def commands(self) -> list[str]:
        """The block's commands: continuation lines joined, comments and ``&&`` split off."""
        text = self.code.replace("\\\n", " ")
        lines = text.splitlines()
        if self.tag == "console":  # "$ command" lines; the others are its output
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        return [part for line in lines for part in split_command(line)]


def split_command(line: str) -> list[str]:
    """``line`` without its trailing comment, split at ``&&``, each part stripped."""
    command = line[: _comment_start(line)]
    return [part.strip() for part in command.split(" && ") if part.strip()]


def _comment_start(line: str) -> int:
    quote = ""
    for index, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return index
    return len(line)


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()]
        headings = re.findall(r"^(#{1,6} .*)$", before, re.MULTILINE)
        tag = match.group(1).strip()
        line = before.count("\n") + 1
        blocks.append(Block(tag, match.group(2), line, headings[-1] if headings else ""))
    return blocks


def inline_commands(text: str) -> list[tuple[int, str]]:
    """Inline code of the prose that is a command, with the line it is on."""
    fenced = [match.span() for match in FENCE.finditer(text)]
    found = []
    for match in INLINE.finditer(text):
        inside = any(start <= match.start() < end for start, end in fenced)
        if not inside and INLINE_COMMAND.match(match.group(1)):
            found.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return found


def steps(text: str) -> list[tuple[int, str, str]]:
    """The README's commands in the order a reader meets them: (line, shell, command)."""
    found = [(line, "sh", command) for line, command in inline_commands(text)]
    for block in readme_blocks(text):
        if block.tag in SHELL_TAGS:
            found += [(block.line, SHELL_TAGS[block.tag], c) for c in block.commands]
    return sorted(found, key=lambda step: step[0])


# --- the walk through the README: state shared by the commands, in order ------------------


@dataclass
class Background:
    """A long-running command started in its own process group (a terminal's foreground job)."""

    command: str
    process: trio.Process
    log: Path
    ports: tuple[int, ...]

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Walk:
    folder: Path
    env: dict[str, str]
    port: int = README_PORT  # the port the README's 8000 stands for right now
    server: Background | None = None  # what listens on it
    websocket_client: Background | None = None
    token: str = ""
    ran: list[str] = field(default_factory=list)

    def rewrite(self, command: str) -> str:
        return re.sub(rf":{README_PORT}\b", f":{self.port}", command)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def outside_the_venv(self) -> dict[str, str]:
        """The environment without the tests' virtualenv: where the README runs nox."""
        path = [entry for entry in self.env["PATH"].split(os.pathsep) if entry != str(VENV_BIN)]
        env = {key: value for key, value in self.env.items() if key != "VIRTUAL_ENV"}
        return {**env, "PATH": os.pathsep.join(path)}


async def run(walk: Walk, shell: str, command: str, **kwargs: object) -> str:
    """Run ``command`` with ``shell`` to completion; its stdout, or a failure with its output."""
    options: dict[str, object] = {"cwd": walk.folder, "env": walk.env, **kwargs}
    with trio.fail_after(NOX_TIMEOUT):
        result = await trio.run_process(
            [shell, "-c", command],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            **options,  # type: ignore[arg-type]
        )
    output = result.stdout.decode(errors="replace")
    errors = result.stderr.decode(errors="replace")
    assert result.returncode == 0, f"`{command}` exited with {result.returncode}:\n{errors}"
    return output


async def start(
    walk: Walk, shell: str, command: str, ports: tuple[int, ...], **kwargs: object
) -> Background:
    log = walk.folder / f"background-{len(walk.ran)}.log"
    options: dict[str, object] = {"cwd": walk.folder, "env": walk.env, **kwargs}
    with log.open("wb") as output:
        process = await trio.lowlevel.open_process(  # type: ignore[call-overload]
            [shell, "-c", f"exec {command}"],
            stdin=subprocess.PIPE,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **options,
        )
    return Background(command, process, log, ports)


async def wait_until_it_answers(background: Background, url: str, timeout: float) -> None:
    """Poll ``url`` for a 200; fail with the command's output if it exits or takes too long."""
    async with trio.open_nursery() as nursery:

        async def exits() -> None:
            code = await background.process.wait()
            raise AssertionError(
                f"`{background.command}` exited with {code}:\n{background.output()[-3000:]}"
            )

        nursery.start_soon(exits)
        try:
            await wait_for_status(url, 200, timeout)
        except trio.TooSlowError:
            raise AssertionError(
                f"`{background.command}`: {url} did not answer 200 in {timeout} s:\n"
                + background.output()[-3000:]
            ) from None
        nursery.cancel_scope.cancel()


async def wait_for_output(background: Background, wanted: Callable[[str], bool]) -> str:
    with trio.move_on_after(OUTPUT_TIMEOUT):
        while not wanted(output := background.output()):
            assert background.process.returncode is None, output
            await trio.sleep(0.05)
        return output
    raise AssertionError(f"`{background.command}` did not print what was expected:\n{output}")


async def ctrl_c(background: Background, clean_exit: bool) -> None:
    """What Ctrl-C in its terminal does: SIGINT to the process group; wait until it stopped."""
    process = background.process
    if process.returncode is None:
        os.killpg(process.pid, signal.SIGINT)
    with trio.move_on_after(STOP_TIMEOUT):
        await process.wait()
    if process.returncode is None:
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise AssertionError(f"Ctrl-C did not stop `{background.command}`")
    if clean_exit:
        assert process.returncode == 0, background.output()[-3000:]
    for port in background.ports:
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"{port} still listens"


async def stop_what_listens(walk: Walk) -> None:
    """The reader stops the running server (Ctrl-C) before starting another one on 8000."""
    if walk.websocket_client is not None:
        await ctrl_c(walk.websocket_client, clean_exit=False)
        walk.websocket_client = None
    if walk.server is not None:
        await ctrl_c(walk.server, clean_exit=walk.server.command.startswith("triows serve"))
        walk.server = None


def websocket_frames(output: str) -> list[dict[str, object]]:
    """The frames ``python3 -m websockets`` printed (``< {...}`` lines, terminal codes aside)."""
    frames = []
    for match in re.finditer(r"< (\{.*\})", output):
        frames.append(json.loads(match.group(1)))
    return frames


async def hello_of(url: str) -> dict[str, object]:
    async with open_websocket_url(url) as websocket:
        hello: dict[str, object] = json.loads(await websocket.get_message())
        return hello


# --- what each command does, and how it is checked -------------------------------------


def ci_commands() -> list[str]:
    """The commands ``.ci/run`` runs, ``--quiet`` aside."""
    lines = CI_SCRIPT.read_text().splitlines()
    commands = [line for line in lines if line.startswith("python3 ")]
    return [" ".join(word for word in line.split() if word != "--quiet") for line in commands]


async def in_ci(walk: Walk, shell: str, command: str) -> None:
    assert command in ci_commands(), f"`{command}` is not what .ci/run runs: {ci_commands()}"


async def the_tests_venv(walk: Walk, shell: str, command: str) -> None:
    # Stands for the reader's virtualenv with triows installed: this test's own.
    triows = await run(walk, shell, "command -v triows")
    assert Path(triows.strip()).parent == VENV_BIN


async def demo(walk: Walk, shell: str, command: str) -> None:
    output = await run(walk, shell, command, cwd=ROOT, env=walk.outside_the_venv())
    assert "Anne -> POST /send {'to': 'Bob'}: 202" in output, output
    assert re.search(r"Bob <- .*over the WebSocket", output), output


async def nox_session_listed(walk: Walk, shell: str, command: str) -> None:
    (session,) = re.findall(r"-s (\w+)$", command)
    listing = await run(walk, shell, "python3 -m nox --list", cwd=ROOT, env=walk.outside_the_venv())
    assert re.search(rf"^[*-] {session}\b", listing, re.MULTILINE), listing


async def serve(walk: Walk, shell: str, command: str) -> None:
    await stop_what_listens(walk)
    walk.port = free_port()
    command = walk.rewrite(command)
    if "--bind" not in command:
        walk.env["TRIOWS_BIND"] = f"127.0.0.1:{walk.port}"
    backend = re.search(r"--backend (\S+)", command)
    if backend is not None and backend.group(1) != "memory":
        await require_broker("rabbitmq")
        walk.env["TRIOWS_EXCHANGE"] = unique_exchange()
    walk.server = await start(walk, shell, command, (walk.port,))
    walk.ran.append(command)
    await wait_until_it_answers(walk.server, f"{walk.base_url}/readyz", START_TIMEOUT)
    walk.env.pop("TRIOWS_BIND", None)
    if walk.token:
        # Signed with the same secret: the token is Bob's way in; without it, no way in.
        hello = await hello_of(f"ws://127.0.0.1:{walk.port}/events?token={walk.token}")
        assert hello["user"] == "Bob"
        async with httpx.AsyncClient() as http:
            refused = await http.get(
                f"{walk.base_url}/events?user=Bob", headers={"Accept": "text/event-stream"}
            )
        assert refused.status_code == 401, refused.text


async def installs(walk: Walk, shell: str, command: str) -> None:
    await run(walk, shell, command)


async def websocket_client(walk: Walk, shell: str, command: str) -> None:
    assert walk.server is not None, "no server to listen on"
    walk.websocket_client = await start(walk, shell, walk.rewrite(command), ())
    output = await wait_for_output(
        walk.websocket_client, lambda out: any(f["type"] == "hello" for f in websocket_frames(out))
    )
    (hello,) = [f for f in websocket_frames(output) if f["type"] == "hello"]
    assert hello["user"] == "Bob"
    # The tour: typed into Bob's socket, a send to himself gets an ack, then the message.
    process = walk.websocket_client.process
    assert process.stdin is not None
    line = '{"type":"send","to":"Bob","message":"a note to self"}\n'
    await process.stdin.send_all(line.encode())
    output = await wait_for_output(
        walk.websocket_client,
        lambda out: {"ack", "message"} <= {f["type"] for f in websocket_frames(out)},
    )
    types = [f["type"] for f in websocket_frames(output)]
    # The ack and the message itself race (the message comes through the
    # session's queue while the ack is written): either order.
    assert types[0] == "hello" and sorted(types[1:]) == ["ack", "message"], output
    assert any(f.get("message") == "a note to self" for f in websocket_frames(output)), output


async def send(walk: Walk, shell: str, command: str) -> None:
    assert walk.server is not None, "no server to send to"
    # curl's own config file adds the status line after the body: the command stays as written.
    curl_home = walk.folder / "curl"
    curl_home.mkdir(exist_ok=True)
    (curl_home / ".curlrc").write_text('write-out = "\\n%{http_code}\\n"\n')
    output = await run(
        walk, shell, walk.rewrite(command), env={**walk.env, "CURL_HOME": str(curl_home)}
    )
    body, status = output.strip().rsplit("\n", 1)
    assert status == "202", output
    answer = json.loads(body)
    assert answer["status"] == "routed", output
    if walk.websocket_client is not None:
        output = await wait_for_output(
            walk.websocket_client,
            lambda out: any(f.get("id") == answer["id"] for f in websocket_frames(out)),
        )
        (frame,) = [f for f in websocket_frames(output) if f.get("id") == answer["id"]]
        assert (frame["type"], frame["from"], frame["to"]) == ("message", "Anne", "Bob")
    # "Send to Nobody and the answer is 404".
    nobody = walk.rewrite(command).replace('"to":"Bob"', '"to":"Nobody"')
    output = await run(walk, shell, nobody, env={**walk.env, "CURL_HOME": str(curl_home)})
    assert output.strip().endswith("\n404"), output


async def server_sent_events(walk: Walk, shell: str, command: str) -> None:
    assert walk.server is not None, "no server to listen on"
    events = await start(walk, shell, walk.rewrite(command), ())
    try:
        await wait_for_output(events, lambda out: '"type":"hello"' in out)
    finally:
        await ctrl_c(events, clean_exit=False)


async def export(walk: Walk, shell: str, command: str) -> None:
    (name,) = re.findall(r"^export (\w+)=", command)
    value = await run(walk, shell, f'{command}\nprintf %s "${name}"')
    walk.env[name] = value
    if name == "TRIOWS_SECRET":
        assert len(value.encode()) >= 32, "the server refuses a secret under 32 bytes"


async def token(walk: Walk, shell: str, command: str) -> None:
    output = await run(walk, shell, command)
    walk.token = output.strip()
    claims = jwt.decode(walk.token, walk.env["TRIOWS_SECRET"], algorithms=["HS256"])
    (user,) = re.findall(r"^triows token (\S+)", command)
    assert claims["sub"] == user
    ttl = re.search(r"--ttl (\d+)", command)
    if ttl is not None:
        assert claims["exp"] - claims["iat"] == int(ttl.group(1))


async def cluster(walk: Walk, shell: str, command: str) -> None:
    await stop_what_listens(walk)
    backend = re.search(r"--backend (\S+)", command)
    broker = {"amqp091": "rabbitmq", "amqp10": "rabbitmq-amqp10", "stomp": "rabbitmq-stomp"}
    await require_broker(broker[backend.group(1) if backend else "amqp091"])
    walk.port = free_port()
    instances = [free_port() for _ in range(CLUSTER_INSTANCES)]
    ports = f"--port {walk.port} --instance-ports {','.join(map(str, instances))}"
    command = f"{command} {ports}" if " -- " in command else f"{command} -- {ports}"
    env = {**walk.outside_the_venv(), "TRIOWS_EXCHANGE": unique_exchange()}
    walk.server = await start(walk, shell, command, (walk.port, *instances), cwd=ROOT, env=env)
    walk.ran.append(command)
    await wait_until_it_answers(walk.server, f"{walk.base_url}/readyz", NOX_TIMEOUT)
    async with httpx.AsyncClient() as http:
        page = await http.get(f"{walk.base_url}/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        # Bob on one instance, Anne's message through HAProxy reaches him.
        async with open_websocket_url(f"ws://127.0.0.1:{walk.port}/events?user=Bob") as bob:
            assert json.loads(await bob.get_message())["type"] == "hello"
            sent = await http.post(
                f"{walk.base_url}/send", json={"to": "Bob", "from": "Anne", "message": "hi"}
            )
            assert sent.status_code == 202, sent.text
            with trio.fail_after(OUTPUT_TIMEOUT):
                frame = json.loads(await bob.get_message())
            assert (frame["type"], frame["message"]) == ("message", "hi")


Check = Callable[[Walk, str, str], Awaitable[None]]


@dataclass(frozen=True)
class Command:
    pattern: str  # a regular expression the whole command must match
    how: str  # how it is covered, in words
    check: Check


SET_UP = "set-up, not run: this test runs in such a virtualenv (nox's tests session)"
COMMANDS = (
    Command(r"python3 -m pip install --upgrade nox", "CI: .ci/run runs it", in_ci),
    Command(r"python3 -m nox", "CI: .ci/run runs it (lint, types, this suite)", in_ci),
    Command(r"python3 -m nox -s demo", "run: Anne's POST gets 202, Bob gets both", demo),
    Command(
        r"python3 -m nox -s (unit|bench_matrix|faults)",
        "listed, not run: the fast loop is part of the tests session; the bench and the fault"
        " cases take many minutes and the shared brokers down (run by hand)",
        nox_session_listed,
    ),
    Command(r"python3 -m venv \.venv", SET_UP, the_tests_venv),
    Command(r"\. \.venv/bin/activate", SET_UP, the_tests_venv),
    Command(r"python3 -m pip install \.", SET_UP, the_tests_venv),
    Command(r"python3 -m pip install websockets", "run: installs (or has) it", installs),
    Command(r"triows serve\b.*", "run in the background until /readyz answers", serve),
    Command(
        r"python3 -m websockets 'ws://\S+'",
        "run in the background: prints Bob's hello; a typed send gets an ack and the message",
        websocket_client,
    ),
    Command(
        r"curl -H 'Content-Type: application/json' .* http://\S+/send",
        "run: 202 routed, Bob's client prints the message; to Nobody: 404",
        send,
    ),
    Command(
        r"curl -N .*/events\?user=Bob'",
        "run in the background: prints the hello",
        server_sent_events,
    ),
    Command(r"export \w+=.*", "run: the value is kept for the next commands", export),
    Command(r"triows token .*", "run: a token for the user, signed with the secret", token),
    Command(
        r"python3 -m nox -s cluster( -- --backend (amqp091|amqp10|stomp))?",
        "run in the background until HAProxy's /readyz answers; Anne's message reaches Bob",
        cluster,
    ),
)


def command_for(command: str) -> Command:
    found = [entry for entry in COMMANDS if re.fullmatch(entry.pattern, command)]
    assert found, (
        f"README command `{command}` is not covered: add how to check it to COMMANDS "
        "in tests/test_readme_commands.py"
    )
    return found[0]


def check_python_block(block: Block) -> None:
    assert block.section in PYTHON_EXAMPLES_TEST.read_text(), (
        f"the python block of README.md line {block.line} ({block.section}) is not run by "
        f"{PYTHON_EXAMPLES_TEST.name}"
    )


def test_every_block_and_command_is_covered() -> None:
    """Fast, nothing run: every block and command of the README has its way of being checked."""
    text = README.read_text()
    for block in readme_blocks(text):
        where = f"README.md line {block.line}"
        if block.tag == "python":
            check_python_block(block)
        elif block.tag in SHELL_TAGS:
            assert block.commands, f"{where}: a {block.tag} block without a command"
        else:
            assert block.tag == "text", f"{where}: a block tagged {block.tag!r}: how is it run?"
    for line, _, command in steps(text):
        assert command_for(command), f"README.md line {line}"


async def test_every_command_runs_as_written_and_does_what_the_readme_says(
    tmp_path: Path,
) -> None:
    # The reader's shell with the virtualenv active: its bin first on PATH.
    path = os.pathsep.join([str(VENV_BIN), os.environ["PATH"]])
    walk = Walk(tmp_path, {**os.environ, "PATH": path, "VIRTUAL_ENV": sys.prefix})
    try:
        for line, shell, command in steps(README.read_text()):
            entry = command_for(command)
            print(f"README.md line {line}: {command}\n    {entry.how}", flush=True)
            with trio.fail_after(NOX_TIMEOUT):
                await entry.check(walk, shell, command)
            walk.ran.append(command)
        # The last server: Ctrl-C drains and stops it.
        await stop_what_listens(walk)
    finally:
        for background in (walk.websocket_client, walk.server):
            if background is not None and background.process.returncode is None:
                os.killpg(background.process.pid, signal.SIGKILL)
                with trio.CancelScope(shield=True):
                    await background.process.wait()
