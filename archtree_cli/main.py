"""The `archtree` command line."""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from archtree_cli.environment import unknown_variable_warnings
from archtree_cli.stop_signals import StopSignals, Terminated
from search.errors import ArchtreeError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + 15  # as a command stopped by SIGTERM exits
EXIT_BROKEN_PIPE = 128 + 13  # as a command stopped by SIGPIPE exits


# What a command does instead of an option of another command a user may carry over.
INSTEAD_OF_OPTION = {
    ("submit", "--out"): "a job's result files are fetched once it is done: "
    "`archtree fetch JOB_ID --out DIR` (`archtree status JOB_ID --watch` follows it)",
    ("prune", "--api"): "`archtree prune` searches on this machine, with no service; "
    "`archtree submit --api URL` sends the same search to a service",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage mistakes reported on one line like every other error, and options
    only by their full names: a prefix is no option (`agent --device` would have been taken as
    --device-class, though --device is another command's option, of another meaning)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        # The options given to this command that it does not know, said with those it lacks.
        self.unknown_said = ""

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        """As argparse's, with a value that starts with a dash taken as its option's value
        (`--input-shape -1,28,28`), and an unknown option told by the command it was given
        to, with the command it belongs to or the option of this one its name is closest
        to."""
        args = self._dash_values_joined(sys.argv[1:] if args is None else list(args))
        self._refuse_options_before_the_command(args)
        self._tell_unknown_options_with_missing_ones(args)
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = self._command_parser(parsed)
            command.error(
                f"unrecognized arguments: {' '.join(unknown)}"
                + self._unknown_hint(unknown, getattr(parsed, "command", None), command)
            )
        return parsed

    def _refuse_options_before_the_command(self, args: list[str]) -> None:
        """An option given before the command is not archtree's own (--debug, --help) but
        some command's: said so, not taken for a wrong command."""
        commands = self._parsers()
        for token in args if commands else []:  # a command's own parser has none to check
            if not token.startswith("-"):
                return  # the command
            if token.partition("=")[0] not in self._option_string_actions:
                self.error(
                    f"{token} given before the command: a command's options go after it, "
                    f"as in `archtree prune --width 3` (commands: {', '.join(commands)})"
                )

    def _tell_unknown_options_with_missing_ones(self, args: list[str]) -> None:
        """argparse says the options a command lacks before those it does not know: the
        command's parser is given the unknown ones to say beside the missing ones (`prune
        --widt 3` with no --data says both)."""
        commands = self._parsers()
        name = next((token for token in args if not token.startswith("-")), None)
        command = commands.get(name or "")
        if not isinstance(command, ArgumentParser):
            return
        given = args[args.index(name) + 1 :]
        given = given[: given.index("--")] if "--" in given else given
        unknown = [
            token
            for token in given
            if token.startswith("--")
            and token.partition("=")[0] not in command._option_string_actions
        ]
        if unknown:
            command.unknown_said = (
                f"unrecognized arguments: {' '.join(unknown)}"
                + self._unknown_hint(unknown, name, command)
            )

    def _parsers(self) -> dict[str, argparse.ArgumentParser]:
        """This parser's commands by name (none for a command's own parser)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    def _dash_values_joined(self, args: list[str]) -> list[str]:
        """`--input-shape -1,28,28` as `--input-shape=-1,28,28`: argparse takes a value that
        starts with a dash for an option, and says the option expected an argument. Only a
        value after an option that takes one, and that is no option of any command."""
        parsers = [self, *self._parsers().values()]
        known = {name for parser in parsers for name in parser._option_string_actions}
        takes_value = {
            name
            for parser in parsers
            for name, action in parser._option_string_actions.items()
            if action.nargs is None and not isinstance(action, argparse._SubParsersAction)
        }
        joined: list[str] = []
        index = 0
        while index < len(args):
            token = args[index]
            following = args[index + 1] if index + 1 < len(args) else ""
            if token == "--":
                return joined + args[index:]
            if (
                token in takes_value
                and following.startswith("-")
                and not following.startswith("--")
                and following.partition("=")[0] not in known
            ):
                joined.append(f"{token}={following}")
                index += 2
            else:
                joined.append(token)
                index += 1
        return joined

    def _unknown_hint(
        self, unknown: list[str], name: str | None, command: argparse.ArgumentParser
    ) -> str:
        """What to use instead of the first unknown option: what the command does instead,
        the other commands it is an option of, and the command's option closest to it."""
        for given in unknown:
            option = given.partition("=")[0]
            if not option.startswith("--"):
                continue
            instead = INSTEAD_OF_OPTION.get((name, option))
            if instead:
                return f"; {instead}"
            owners = [
                f"`archtree {other}`"
                for other, parser in self._parsers().items()
                if other != name and option in parser._option_string_actions
            ]
            close = difflib.get_close_matches(
                option, command._option_string_actions, n=1, cutoff=0.6
            )
            said = []
            if owners:
                where = f"`archtree {name}`" if name else "archtree itself"
                said.append(f"{option} is an option of {_listed(owners)}, not of {where}")
            if close:
                said.append(f"did you mean {close[0]}?")
            if said:
                return "; " + "; ".join(said)
        return ""

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The parser of the command `parsed` ran (this one when it has no commands)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(parsed, action.dest, None) or "")
                if chosen is not None:
                    return chosen
        return self

    def error(self, message: str) -> None:  # type: ignore[override]
        if self.unknown_said and message.startswith("the following arguments are required"):
            message = f"{message}; {self.unknown_said}"
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _listed(names: list[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def add_model_arguments(
    parser: argparse.ArgumentParser,
    classes_default: str = "the data's number of classes, or 10 for data without labels",
    also: str = "",
) -> None:
    """--model, --weights, --allow-pickle and --num-classes; `also` names other --model forms."""
    parser.add_argument(
        "--model",
        required=True,
        type=model_source_argument(takes_folder=bool(also)),
        help="builtin:NAME (see `archtree models`), module:package.module:callable, "
        f"torchvision:NAME or timm:NAME{also}",
    )
    parser.add_argument(
        "--weights",
        type=non_empty("--weights"),
        help="trained weights: .safetensors or a state dict file",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow a weights file that is a pickled whole module (runs arbitrary code: only "
        "for files you trust)",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        help="classifier outputs of a builtin:, torchvision: or timm: model "
        f"(default: {classes_default})",
    )


def model_source_argument(takes_folder: bool):
    """An argparse type for --model: the text as given, refused when empty, and, for a
    command that takes no result folder, when it is a folder or a Python file here given
    without a source's prefix (a result folder `prune` wrote, a model's own file)."""
    given = non_empty("--model", "a model source")

    def check(text: str) -> str:
        text = given(text).strip()  # a source has no spaces around it: a stray one is dropped
        if ":" in text or takes_folder:
            return text
        forms = "builtin:NAME, module:package.module:callable, torchvision:NAME or timm:NAME"
        if os.path.isdir(text):
            raise argparse.ArgumentTypeError(
                f"{text!r} is a folder here, not a model source (only `archtree measure` "
                f"takes a result folder): give {forms}"
            )
        if text.endswith(".py") and os.path.isfile(text):
            folder = os.path.dirname(text) or "."
            stem = os.path.splitext(os.path.basename(text))[0]
            raise argparse.ArgumentTypeError(
                f"{text!r} is a Python file, not a model source: name its module and the "
                f"callable that builds the model, as in module:{stem}:build_model, with the "
                f"file's folder on PYTHONPATH (PYTHONPATH={folder} archtree ...)"
            )
        return text

    return check


def non_empty(option: str, what: str = "a path"):
    """An argparse type: the text as given, refused when empty (an unset shell variable)."""

    def check(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(
                f"{option} is empty: give {what} (is the shell variable it came from unset?)"
            )
        return text

    return check


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="local",
        help="where latency is measured: local (this CPU) or local:cuda (default: local)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="batch size timed (default 1)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads while timing (default 1)"
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="latency cache folder (default: $ARCHTREE_HOME/latency-cache, "
        "ARCHTREE_HOME defaults to ~/.cache/archtree)",
    )


def _move_list(text: str) -> tuple[str, ...]:
    """`global,latency` -> ("global", "latency"); SearchSettings checks the names."""
    return tuple(kind.strip() for kind in text.split(",") if kind.strip())


class GivenOption(argparse.Action):
    """Stores the value, as argparse's default action does, and records the option as given:
    an option given at its default value is still one the user chose."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        given = getattr(namespace, GIVEN_OPTIONS, frozenset())
        setattr(namespace, GIVEN_OPTIONS, given | set(self.option_strings))


# Where GivenOption records the options given, on the parsed arguments.
GIVEN_OPTIONS = "given_options"


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    from search.settings import MOVE_KINDS, STRATEGIES, SearchSettings

    defaults = SearchSettings()
    # Every option of this parser records when it is given (settings_from names those the
    # strategy overrides).
    parser.register("action", None, GivenOption)
    group = parser.add_argument_group("search")
    group.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=defaults.strategy,
        help="archtree: tree search (default); greedy: width 1; uniform: one ratio everywhere",
    )
    group.add_argument(
        "--width", type=int, default=defaults.width, help="frontier width K (default %(default)s)"
    )
    group.add_argument(
        "--branching",
        type=int,
        default=defaults.branching,
        help="moves tried per frontier node B (default %(default)s)",
    )
    group.add_argument(
        "--planned-steps",
        type=int,
        default=defaults.planned_steps,
        help="depths planned to reach the budget (default %(default)s)",
    )
    group.add_argument(
        "--max-depth",
        type=int,
        default=defaults.max_depth,
        help="depth limit of the tree (default %(default)s)",
    )
    group.add_argument(
        "--moves",
        type=_move_list,
        default=defaults.move_kinds,
        metavar="KIND,...",
        help="moves tried on each candidate, in order of preference, --branching of them at "
        f"most: {', '.join(MOVE_KINDS)} (default {','.join(defaults.move_kinds)})",
    )
    group.add_argument(
        "--ft-steps",
        type=int,
        default=defaults.ft_steps,
        help="fine-tuning steps per child before scoring (default %(default)s)",
    )
    group.add_argument(
        "--bn-samples",
        type=int,
        default=defaults.bn_samples,
        help="training inputs on which batch-norm statistics are recomputed after each "
        "fine-tune, before scoring (0 = off; default %(default)s)",
    )
    group.add_argument(
        "--select-top",
        type=int,
        default=defaults.select_top,
        help="best candidates under budget fine-tuned further and ranked again before the "
        "answer is chosen (default %(default)s)",
    )
    group.add_argument(
        "--select-steps",
        type=int,
        default=defaults.select_steps,
        help="fine-tuning steps of that re-ranking, per candidate (default %(default)s)",
    )
    group.add_argument(
        "--fill-probes",
        type=int,
        default=defaults.fill_probes,
        help="an answer well under the aim is given channels back group by group, each "
        "widening measured: first the groups its last move cut, then any group cut since the "
        "unpruned model, this many measurements at most in each pass "
        "(0 = off; default %(default)s)",
    )
    group.add_argument(
        "--final-epochs",
        type=float,
        default=defaults.final_epochs,
        help="epochs of final fine-tuning with distillation (default %(default)g)",
    )
    group.add_argument(
        "--round-to",
        type=int,
        default=defaults.round_to,
        help="keep channel counts multiples of N (default %(default)s)",
    )
    group.add_argument(
        "--widen-to",
        type=int,
        default=defaults.widen_to,
        metavar="N",
        help="try widening each pruned channel group to the next multiple of N, kept when the "
        "measured latency allows, else half of N, down to 8: free channels where kernels work "
        "in blocks (default: the device's channel block, 16 on AVX-512 CPUs, 8 on AVX2 CPUs "
        "and elsewhere; 0 = off)",
    )
    group.add_argument(
        "--min-width",
        type=float,
        default=defaults.min_width_fraction,
        help="smallest share of a group's channels kept (default %(default)s)",
    )
    group.add_argument(
        "--max-cut",
        type=float,
        default=defaults.max_cut,
        help="largest share of a channel group one step may remove; uniform steps are not "
        "limited (default %(default)s)",
    )
    group.add_argument(
        "--margin",
        type=float,
        default=defaults.margin,
        help="share under the budget the search aims at, so the answer fits when measured "
        "again (default %(default)s)",
    )
    group.add_argument(
        "--importance",
        choices=("l2", "taylor"),
        default=defaults.importance,
        help="channel importance criterion (default %(default)s)",
    )
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def settings_from(args: argparse.Namespace):
    """The search settings the options give, as the strategy runs them; options the strategy
    overrides are named on stderr, unless --quiet."""
    settings = given_settings(args).effective()
    if not getattr(args, "quiet", False):
        for note in strategy_notes(args):
            print(f"archtree: note: {note}", file=sys.stderr)
    return settings


def strategy_notes(args: argparse.Namespace) -> list[str]:
    """The options given that the strategy overrides, a note each."""
    return given_settings(args).ignored_by_strategy(chosen_settings(args))


def chosen_settings(args: argparse.Namespace) -> list[str]:
    """The names of the search settings whose options were given, even at their default."""
    from dataclasses import fields

    from search.settings import SearchSettings, option_of

    options = getattr(args, GIVEN_OPTIONS, frozenset())
    return [
        setting.name for setting in fields(SearchSettings) if option_of(setting.name) in options
    ]


def given_settings(args: argparse.Namespace):
    """The search settings as the options give them, before the strategy overrides any."""
    from search.settings import SearchSettings

    return SearchSettings(
        strategy=args.strategy,
        width=args.width,
        branching=args.branching,
        planned_steps=args.planned_steps,
        max_depth=args.max_depth,
        move_kinds=args.moves,
        ft_steps=args.ft_steps,
        bn_samples=args.bn_samples,
        select_top=args.select_top,
        select_steps=args.select_steps,
        fill_probes=args.fill_probes,
        final_epochs=args.final_epochs,
        round_to=args.round_to,
        widen_to=args.widen_to,
        min_width_fraction=args.min_width,
        margin=args.margin,
        max_cut=args.max_cut,
        importance=args.importance,
        seed=args.seed,
    )


MAIN_EXAMPLES = """\
examples:
  archtree demo                                  train a small ResNet, prune it to 50 %
  archtree prune --model builtin:resnet --weights resnet.safetensors \\
      --data builtin:mnist --budget 8ms --out pruned/
  archtree up                                    the service on this machine
  archtree submit --model builtin:vgg --data builtin:digits --budget 60%
  archtree status ID --watch

`archtree COMMAND --help` gives each command's options; the README gives them all.
"""

PRUNE_EXAMPLES = """\
examples:
  archtree prune --model builtin:resnet --weights resnet.safetensors \\
      --data builtin:mnist --budget 60% --out pruned/
  archtree prune --model module:mypkg.nets:make_net --weights net.pt \\
      --data calibration.npz --budget 8ms --device local:cuda --out pruned/
  archtree prune ... --strategy greedy            one candidate per depth, the baseline
"""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="archtree",
        description="Find the most accurate structurally pruned model that meets a latency "
        "budget measured on the target device.",
        epilog=MAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser
    )

    prune = commands.add_parser(
        "prune",
        help="search for a pruned model that meets a budget",
        epilog=PRUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prune.set_defaults(handler="archtree_cli.commands:run_prune")
    add_model_arguments(prune)
    prune.add_argument(
        "--data",
        required=True,
        type=non_empty("--data", "builtin:mnist, builtin:digits or a data file"),
        help="builtin:mnist, builtin:digits, or a .npz/.pt file holding x (inputs; integer "
        "token ids for a model that looks them up in an nn.Embedding) and optionally y "
        "(labels; without them the search is data-free); a .pt file may also hold an (x, y) "
        "pair, a TensorDataset or x alone, a .npy file x alone",
    )
    prune.add_argument(
        "--budget", required=True, help="latency budget: milliseconds (8ms) or a share (60%%)"
    )
    add_device_arguments(prune)
    add_search_arguments(prune)
    prune.add_argument(
        "--out",
        required=True,
        type=non_empty("--out"),
        help="folder for arch.json, model.safetensors, report.json; if another result lands "
        "there while the search runs, this one goes to OUT-2",
    )
    prune.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the result in --out when the search starts (one another run writes "
        "there meanwhile is kept: this one then goes to OUT-2)",
    )
    prune.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="children evaluated at once in threads (default 1); their pruning, fine-tuning "
        "and scoring pause while a model is timed on this machine, so timings stay quiet and "
        "more jobs gain where that work outweighs the timing",
    )
    prune.add_argument(
        "--train-device",
        default="auto",
        help="where candidates are fine-tuned and scored: auto (the first CUDA GPU torch sees, "
        "else the CPU), cpu, cuda or cuda:N; latency is measured on --device whatever this is "
        "(default auto)",
    )
    prune.add_argument(
        "--restart",
        action="store_true",
        help="start the search afresh, discarding what an interrupted run of the same command "
        "saved (by default it goes on from its last finished depth)",
    )
    prune.add_argument("--quiet", action="store_true", help="print only the final summary")

    measure = commands.add_parser("measure", help="measure a model's latency on a device")
    measure.set_defaults(handler="archtree_cli.commands:run_measure")
    add_model_arguments(
        measure,
        classes_default="10",
        also=", or a folder archtree prune or fetch wrote (arch.json, model.safetensors)",
    )
    measure.add_argument(
        "--input-shape",
        help="one sample's shape: C,H,W for an image (default 1,28,28, or a result folder's "
        "own); a model of your own may take another, such as F or C,L",
    )
    add_device_arguments(measure)
    measure.add_argument(
        "--fresh",
        action="store_true",
        help="time the model again even when the latency cache holds its timing (the new "
        "timing replaces it); without it, a timing made before with the same settings is "
        "shown, and said to be",
    )

    models = commands.add_parser("models", help="list the builtin models")
    models.set_defaults(handler="archtree_cli.commands:run_models")

    demo = commands.add_parser(
        "demo", help="train a small ResNet on MNIST and prune it to 50%% of its latency"
    )
    demo.add_argument(
        "--out",
        default="archtree-demo",
        type=non_empty("--out"),
        help="output folder (default archtree-demo); an earlier demo's result there is replaced",
    )
    demo.add_argument("--budget", default="50%", help="latency budget (default 50%%)")
    demo.add_argument(
        "--overwrite", action="store_true", help="replace a result in --out that no demo wrote"
    )
    demo.set_defaults(handler="archtree_cli.commands:run_demo")

    from archtree_cli.service_commands import add_service_commands

    add_service_commands(commands)
    for command in commands.choices.values():
        # Also after the command (`archtree measure ... --debug`); SUPPRESS keeps a --debug
        # given before it.
        command.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks of internal errors",
        )
    return parser


# Options whose value may start with a minus sign.
VALUE_OPTIONS = ("--budget",)


def joined_values(argv: Sequence[str]) -> list[str]:
    """`--budget -5ms` as `--budget=-5ms`: argparse takes a value that starts with `-` for
    an option, and would answer "expected one argument" instead of what is wrong with it."""
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] in VALUE_OPTIONS and arg[:1] == "-" and arg[:2] != "--":
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


def interrupted_note(args: argparse.Namespace) -> str | None:
    """What an interrupted command kept, and what goes on without it."""
    if args.command == "demo" and getattr(args, "demo_training", False):
        return (
            f"nothing was written to {args.out}; the demo model was not trained to the end, "
            "and the next `archtree demo` trains it from the start"
        )
    if args.command in ("prune", "demo"):
        kept = (
            f"nothing was written to {args.out}; the latencies measured so far are in the "
            "latency cache, so running the same command again does not measure them again"
        )
        checkpoint = getattr(args, "saved_search", None)
        # One that could no longer be written (a full disk, a read-only folder) is not saved,
        # whatever an earlier run left in its folder.
        usable = checkpoint is not None and not checkpoint.disabled
        saved = checkpoint.saved() if usable else None
        if saved is None:
            return kept
        state, _ = saved
        if state.done:
            where = "with its tree search finished"
        elif state.depth:
            where = f"after depth {state.depth}"
        else:
            where = "with its unpruned model measured"
        from archtree_cli.commands import goes_on_from_there  # loaded already: it pruned

        restarted = bool(getattr(args, "restart", False))
        return f"{kept}; the search is saved {where}, and {goes_on_from_there(restarted)}"
    if args.command == "submit":
        return submit_interrupted_note(args)
    if args.command == "status" and args.watch and getattr(args, "cancel_requested", False):
        return (
            f"job {args.job} goes on on the service until its requested cancel takes effect, "
            f"at its next step; `archtree status {args.job} --api {args.api}` shows when it "
            "has ended"
        )
    if args.command == "status" and args.watch:
        return (
            f"job {args.job} goes on on the service; stop it with "
            f"`archtree cancel {args.job} --api {args.api}`"
        )
    return None


def submit_interrupted_note(args: argparse.Namespace) -> str | None:
    """What an interrupted `submit` left on the service: nothing before it sent the job; a job
    it cannot name while the service's answer was awaited, since the service may have created
    it all the same; the job it printed after that."""
    job_id = getattr(args, "submitted_job", None)
    if job_id:
        return (
            f"job {job_id} was submitted and goes on on the service; follow it with "
            f"`archtree status {job_id} --api {args.api} --watch`, or stop it with "
            f"`archtree cancel {job_id} --api {args.api}`"
        )
    if getattr(args, "submission_sent", False):
        from archtree_cli.service_commands import send_again_hint

        return (
            f"the job was sent, though its id never arrived; {send_again_hint(args.submission_key)}"
        )
    return None


DEBUG_ON = ("1", "true", "yes", "on")
DEBUG_OFF = ("", "0", "false", "no", "off")


def debug_from_environment() -> bool:
    """ARCHTREE_DEBUG as a switch: 1/true/yes/on or 0/false/no/off (or unset)."""
    value = os.environ.get("ARCHTREE_DEBUG", "").strip().lower()
    if value not in DEBUG_ON + DEBUG_OFF:
        raise ArchtreeError(
            f"ARCHTREE_DEBUG={value!r} is not a switch: set it to 1 (tracebacks of internal "
            "errors) or 0, or unset it"
        )
    return value in DEBUG_ON


def _drop_stdout() -> None:
    """Point stdout at /dev/null, where it cannot be written: so that the interpreter's last
    flush does not fail again on a closed pipe or a full disk."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    # From the start: a Ctrl-C while the options are read (their modules load) stops the
    # command in one line too.
    with StopSignals() as signals:
        try:
            args = build_parser().parse_args(joined_values(sys.argv[1:] if argv is None else argv))
            signals.raise_held()  # held while the options' modules loaded: stop before running
        except KeyboardInterrupt as stop:
            return _stopped(stop, signals, note=None)
        signals.exit_code = _run(args, signals)
        return signals.exit_code


def _stopped(stop: KeyboardInterrupt, signals: StopSignals, note: str | None) -> int:
    """Say that the command was stopped (by Ctrl-C, or SIGTERM: Terminated) and what it
    left (`note`); return its exit code."""
    signals.stopped()
    said = "terminated" if isinstance(stop, Terminated) else "interrupted"
    print(f"archtree: {said}{f': {note}' if note else ''}", file=sys.stderr)
    return EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED


def _run(args: argparse.Namespace, signals: StopSignals) -> int:
    try:
        debug_from_environment()  # a bad value is refused before any work
        for warning in unknown_variable_warnings():
            print(f"archtree: warning: {warning}", file=sys.stderr)
        module_name, function_name = args.handler.split(":")
        code = getattr(importlib.import_module(module_name), function_name)(args)
        signals.raise_held()  # held while the command's last import ran
        sys.stdout.flush()  # a write that fails fails here, where it is reported
        return code
    except ArchtreeError as error:
        print(f"archtree: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        # Whoever read the output stopped (`archtree jobs | head -1`): stop quietly.
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as stop:
        return _stopped(stop, signals, interrupted_note(args))
    except Exception as error:  # noqa: BLE001 - last line of defence for the user's terminal
        if args.debug or debug_from_environment():
            raise
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {error.filename}" if error.filename else ""
            print(
                f"archtree: error: no space left{where} ({error.strerror}): free some space, "
                "or write elsewhere, and run again",
                file=sys.stderr,
            )
            _drop_stdout()
            return EXIT_USER_ERROR
        print(
            f"archtree: internal error: {type(error).__name__}: {error} "
            "(rerun with --debug for the traceback, and report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
