"""A job's inputs, loaded and checked together: the data, the model, its weights."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn

from search.data_source import MAX_CLASSES, DataSplits, load_data
from search.errors import ArchtreeError, a_or_an, first_line
from search.memory import out_of_memory
from search.model_source import ModelRef, build_model, check_prunable_form, load_weights
from search.timing_input import (
    DESCRIPTION,
    TOKEN_DESCRIPTION,
    embedding_sizes,
    embeds_inputs,
    timing_input,
    token_range_of,
)


@dataclass
class JobInputs:
    model_ref: ModelRef
    model: nn.Module
    data: DataSplits


def load_inputs(
    model_source: str,
    data_source: str,
    *,
    weights: str | None = None,
    allow_pickle: bool = False,
    num_classes: int | None = None,
    seed: int = 0,
) -> JobInputs:
    """Load data and model, apply the weights, and check one sample runs forward."""
    data = load_data(data_source, seed=seed)
    if num_classes is None:
        check_labels_dense(data, data_source)
    classes = num_classes if num_classes is not None else (data.num_classes or 10)
    if not 2 <= classes <= MAX_CLASSES:
        raise ArchtreeError(
            f"the model's number of classes (--num-classes) must be "
            f"between 2 and {MAX_CLASSES}, not {classes}"
        )
    shape = tuple(data.input_shape)
    channels_last = _channels_last(shape)
    own_model = model_source.startswith("module:")
    if not own_model and len(shape) != 3:
        raise ArchtreeError(
            f"{model_source} takes images, and a sample of {data_source} has shape {shape}: "
            "give N,C,H,W or N,H,W images, or prune a model of your own (module:) that takes "
            "these inputs."
        )
    if model_source.startswith("builtin:") and channels_last:
        # A builtin model takes as many channels as the data have: it would run on them.
        raise ArchtreeError(f"the inputs of {data_source} have shape {shape}: {channels_last}.")
    ref = ModelRef(source=model_source, num_classes=classes, in_channels=data.input_shape[0])
    torch.manual_seed(seed)
    model = build_model(ref)
    check_prunable_form(model, model_source)
    if weights:
        load_weights(model, weights, allow_pickle=allow_pickle)
    model.eval()
    read_shape = tuple(data.input_shape)
    output, data = _first_forward(model, data, model_source, data_source)
    # Read as N,C,L sequences, not N,H,W greyscale images (token ids keep their record).
    if data.token_range is None and tuple(data.input_shape) != read_shape:
        ref = replace(ref, in_channels=data.input_shape[0])
    if num_classes is not None and output.shape[1] != num_classes:
        raise ArchtreeError(
            f"--num-classes {num_classes} does not apply to {model_source}, which builds its "
            f"own model with {output.shape[1]} outputs: leave --num-classes out (it sizes "
            "builtin, torchvision and timm models)."
        )
    if data.labelled and output.shape[1] < (data.num_classes or 0):
        outputs = output.shape[1]
        labels = torch.cat([y for y in (data.train_y, data.calib_y, data.val_y) if y is not None])
        if int(labels.min()) >= 1 and data.num_classes == outputs + 1:
            raise ArchtreeError(
                f"the labels of {data_source} run from {int(labels.min())} to "
                f"{data.num_classes - 1}, and the model {model_source} outputs {outputs} "
                f"classes, numbered 0 to {outputs - 1}: save the labels less one (y - 1)."
            )
        # Models Archtree builds are sized by the data (or --num-classes); a module: builds
        # its own.
        fix = (
            f"give --num-classes {data.num_classes} or leave it out"
            if num_classes
            else f"give data labelled 0 to {outputs - 1}, or a model with {data.num_classes} "
            "outputs"
        )
        raise ArchtreeError(
            f"{data_source} has {data.num_classes} classes but the model {model_source} outputs "
            f"{outputs}: {fix}."
        )
    return JobInputs(model_ref=ref, model=model, data=data)


def _first_forward(
    model: nn.Module, data: DataSplits, model_source: str, data_source: str
) -> tuple[torch.Tensor, DataSplits]:
    """The model's outputs on two samples, and the data as the model takes them: as floats;
    where it does not take them so, as token ids, for a model with an embedding when every
    input is a whole number 0 and up, or with three axes as N,C,L sequences rather than N,H,W
    greyscale images."""
    try:
        return check_forward(model, data.calib_x[:2], model_source, data_source), data
    except ArchtreeError as as_floats:
        tokens = _as_token_ids(model, data)
        if tokens is not None:
            return _token_forward(model, tokens, model_source, data_source), tokens
        if str(as_floats).endswith(_EMBEDDING):  # a text model, given what are not token ids
            raise ArchtreeError(
                f"{str(as_floats).removesuffix(_EMBEDDING)}it looks its inputs up in an "
                f"embedding (nn.Embedding), as token ids, and {data_source}'s inputs are not "
                f"token ids ({data.not_token_ids()}): {_TOKEN_IDS_FIX}"
            ) from None
        if not (model_source.startswith("module:") and data.channel_added):
            raise
        # Three axes were read as greyscale images; the model may take them as sequences.
        sequences = data.without_added_channel()
        try:
            output = check_forward(model, sequences.calib_x[:2], model_source, data_source)
        except ArchtreeError as as_sequences:
            raise ArchtreeError(
                f"{as_floats} (read as N,C,L sequences of shape {sequences.input_shape}, it "
                f"fails too: {as_sequences})"
            ) from None
        return output, sequences


def _token_forward(
    model: nn.Module, tokens: DataSplits, model_source: str, data_source: str
) -> torch.Tensor:
    """The model's outputs on two samples of token ids, which its embeddings must hold (ids
    beyond them are the likelier cause of a failure, and said first)."""
    _check_token_ids(model, tokens, model_source, data_source)
    return check_forward(
        model, tokens.calib_x[:2], model_source, data_source, token_range=tokens.token_range
    )


def _as_token_ids(model: nn.Module, data: DataSplits) -> DataSplits | None:
    """The data as token ids for a model that looks inputs up in an embedding, when every
    input is a whole number in [0, 2**24) (saved as integers or as floats); None otherwise."""
    if not embeds_inputs(model):
        return None
    return data.as_token_ids(token_range_of(model))


def _check_token_ids(
    model: nn.Module, tokens: DataSplits, model_source: str, data_source: str
) -> None:
    """Refuse token ids that no embedding of the model can look up."""
    largest_size = max(embedding_sizes(model))
    largest_id = tokens.largest_token_id()
    if largest_id >= largest_size:
        raise ArchtreeError(
            f"{data_source} holds token ids up to {largest_id}, but the largest embedding of "
            f"the model {model_source} has {largest_size} entries (ids 0..{largest_size - 1}): "
            "give data tokenized with the model's own vocabulary, or weights for a model of "
            "that vocabulary's size."
        )


def check_labels_dense(data: DataSplits, data_source: str) -> None:
    """Refuse labels that leave most of 0..K-1 unused, as a stray label does (100 among the
    labels 0-9 would make a 101-class model): the number of classes is read off the largest
    label only when --num-classes does not give it."""
    splits = [y for y in (data.train_y, data.calib_y, data.val_y) if y is not None and len(y)]
    if not splits or data.num_classes is None:
        return
    labels = torch.cat(splits)
    present = len(torch.unique(labels))
    classes = data.num_classes
    if 2 * present >= classes:
        return
    stray = int((labels >= present).sum())
    raise ArchtreeError(
        f"{data_source}'s labels run to {classes - 1}, but only {present} of the classes "
        f"0..{classes - 1} occur ({stray} sample{'s' if stray != 1 else ''} labelled "
        f"{present} or more): labels must be class indices 0..K-1. Fix the stray labels, or "
        f"give --num-classes {classes} if the model really has {classes} classes."
    )


def check_forward(
    model: nn.Module,
    samples: torch.Tensor,
    model_source: str,
    inputs_label: str,
    *,
    classifier: bool = True,
    token_range: int | None = None,
    batch_option: str | None = None,
) -> torch.Tensor:
    """Run `model` on `samples`, and on the first alone (batches of one are timed by default);
    return its outputs. With `classifier` (what a search needs), the outputs must be finite
    (batch, classes) logits, of two classes at least, and so must the outputs of a forward
    pass in training mode, which fine-tuning runs. `token_range`: the samples are token ids,
    and the model is timed on ids below it. Any failure is the user's model or inputs: an
    ArchtreeError. `batch_option`: the option that sets the batch of `samples`, which one that
    runs out of memory is told to lower."""
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if dtypes:
        raise ArchtreeError(
            f"the model {model_source} has {', '.join(dtypes)} parameters: build it in float32 "
            "(model.float()); the timing dtype is a setting of its own."
        )
    devices = sorted({p.device.type for p in model.parameters()} - {"cpu"})
    if devices:
        raise ArchtreeError(
            f"the model {model_source} has parameters on {', '.join(devices)}: build it on the "
            "CPU (the device candidates are timed on is a setting of its own, --device)."
        )
    outputs = []
    for batch in (samples, samples[:1]):
        try:
            with torch.inference_mode():
                outputs.append(model(batch))
        except Exception as error:  # any failure here means the model rejects this input
            detail = first_line(error) or type(error).__name__
            what = "a batch of one input" if len(batch) == 1 < len(samples) else "inputs"
            shape = tuple(batch.shape[1:])
            if out_of_memory(error):  # the memory, not the inputs' shape
                fix = (
                    f"give a smaller {batch_option} or input shape"
                    if batch_option
                    else "free memory, or give a smaller model or input shape"
                )
                inputs = "input" if len(batch) == 1 else "inputs"
                raise ArchtreeError(
                    f"the model {model_source} ran out of memory on a batch of {len(batch)} "
                    f"{inputs} of shape {shape} from {inputs_label} ({detail}): {fix}."
                ) from None
            hint = _channels_last(shape)
            if token_range is None and embeds_inputs(model) and "ind" in detail:  # indices
                raise ArchtreeError(
                    f"the model {model_source} fails on {inputs_label} ({detail}): {_EMBEDDING}"
                ) from None
            raise ArchtreeError(
                f"the model {model_source} rejects {what} of shape {shape} from "
                f"{inputs_label} ({detail}): give inputs of the shape the model expects"
                + (f"; {hint}." if hint else " (if it expects this one, its forward fails).")
            ) from None
    _check_timing_input(model, tuple(samples.shape[1:]), model_source, inputs_label, token_range)
    output = outputs[0]
    if classifier:
        _check_logits(output, model_source, "")
        _check_logits(
            _training_output(model, samples, model_source), model_source, " in training mode"
        )
        if not bool(torch.isfinite(output).all()):
            tensors = [*model.parameters(), *model.buffers()]
            finite = all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
            cause = (
                "its weights are finite, so its forward makes them on some inputs (an "
                "overflow, of weights too large or of the inputs' scale, a log or a division "
                "of zero): check the weights, the inputs and the forward"
                if finite
                else "its weights are broken (a training run that diverged?); give weights of "
                "a finite model"
            )
            raise ArchtreeError(
                f"the model {model_source} outputs NaN or infinite values on {inputs_label}: "
                f"{cause}."
            )
    return output


# What a model that looks its inputs up in an embedding, given inputs that are not token ids,
# is told.
_TOKEN_IDS_FIX = (
    "save them as integers, whole numbers 0 and up (numpy.savez('data.npz', "
    "x=ids.astype(numpy.int64), y=labels)), and it is timed on random ids its embeddings can "
    "look up."
)
_EMBEDDING = (
    f"it looks its inputs up in an embedding (nn.Embedding), as token ids: {_TOKEN_IDS_FIX}"
)


def _check_timing_input(
    model: nn.Module,
    input_shape: tuple[int, ...],
    model_source: str,
    inputs_label: str,
    token_range: int | None = None,
) -> None:
    """Refuse a model that runs on its data but not on the input it is timed on, before any
    timing: it would fail there, on this machine or on an agent."""
    try:
        with torch.inference_mode():
            model(timing_input(1, input_shape, token_range=token_range))
    except Exception as error:  # any failure here is the model's, on values it cannot take
        detail = first_line(error) or type(error).__name__
        fix = (
            _EMBEDDING
            if token_range is None and embeds_inputs(model)
            else "a model must run on any values of its input shape to be timed; make its "
            "forward accept them."
        )
        made_of = DESCRIPTION if token_range is None else TOKEN_DESCRIPTION.format(token_range)
        raise ArchtreeError(
            f"the model {model_source} runs on {inputs_label} but fails on inputs of that shape "
            f"made of {made_of} ({detail}): {fix}"
        ) from None


def _check_logits(output: object, model_source: str, mode: str) -> None:
    """Refuse outputs that are not (batch, classes) logits of two classes or more."""
    wanted = f"the model {model_source} must return a (batch, classes) tensor of logits{mode}"
    if not isinstance(output, torch.Tensor):
        raise ArchtreeError(
            f"{wanted}; it returned {a_or_an(type(output).__name__)}: wrap it in a module "
            "whose forward returns only the logits"
            + (
                " (torchvision's GoogLeNet and Inception: build them with aux_logits=False)."
                if mode
                else "."
            )
        )
    if output.dim() != 2:
        dense = (
            ": Archtree prunes classifiers, and an output per pixel or position (segmentation, "
            "detection) is not supported; `archtree measure` times such a model"
            if output.dim() > 2
            else ""
        )
        raise ArchtreeError(
            f"{wanted}; it returned a tensor of shape {tuple(output.shape)}{dense}."
        )
    if output.shape[1] < 2:
        raise ArchtreeError(
            f"{wanted}; it returns one value per input. Archtree prunes classifiers: it scores "
            "candidates by accuracy, or without labels by how close their class probabilities "
            "stay to the unpruned model's, which one output cannot show. A binary classifier "
            "needs two logits (trained with cross-entropy); a regression model is not supported."
        )


def _training_output(model: nn.Module, samples: torch.Tensor, model_source: str) -> object:
    """The output of a forward pass in training mode, on a copy (its batch-norm statistics
    stay as they are): a model may return more there, or use layers eval mode leaves out."""
    trained = copy.deepcopy(model).train()
    batch = samples if len(samples) > 1 else torch.cat([samples, samples])
    try:
        with torch.no_grad():
            return trained(batch)
    except Exception as error:  # the model's own code in training mode
        detail = first_line(error) or type(error).__name__
        raise ArchtreeError(
            f"the model {model_source} fails in training mode ({detail}), "
            "in which each candidate is fine-tuned: make its training forward pass run on the "
            "inputs its eval forward pass takes, returning the logits alone."
        ) from None


def _channels_last(shape: tuple[int, ...]) -> str | None:
    """What to do when inputs of this shape look like images stored channels-last (H, W, C)."""
    if len(shape) == 3 and shape[2] in (1, 3, 4) and min(shape[0], shape[1]) > 4:
        channels = "1 channel" if shape[2] == 1 else f"{shape[2]} channels"
        return (
            f"these look like images stored channels-last ({shape[0]}x{shape[1]} with "
            f"{channels}): save x as N,C,H,W, e.g. x.transpose(0, 3, 1, 2)"
        )
    return None
