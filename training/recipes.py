"""Named training presets (recipes) for `python -m training.train`.

A recipe fixes the optimizer, learning-rate schedule, batch size and length of a run. The command
line picks one with `--recipe NAME` and overrides single fields (`--epochs`, `--batch-size`,
`--learning-rate`, ...); the resolved values are written to `<model-dir>/config.json`.

Weight decay is implemented as an L2 penalty added to the loss, not as Keras' decoupled
`weight_decay` optimizer argument. The paper's code (and the ResNet recipe it follows) adds
`weight_decay * sum(w**2) / 2` over the convolution and dense kernels to the loss, so the decay
gradient `weight_decay * w` goes through SGD momentum. Keras' `SGD(weight_decay=...)` instead
subtracts `learning_rate * weight_decay * w` outside the momentum buffer, which with momentum 0.9
is about 10x weaker in steady state for the same coefficient; using it would silently change the
recipe. `kernel_l2_regularizer` gives the penalty as a Keras regularizer, which the training script
passes to the model builders' `kernel_regularizer` argument (every convolution and the classifier
kernel); BatchNorm scales and offsets, biases and the (non-trainable) normalization statistics are
not decayed.

Vision transformers train with AdamW instead (`optimizer="adamw"`, the DeiT recipe that RevViT
follows): decoupled weight decay in the optimizer (Loshchilov and Hutter, 2019) on every weight but
biases, LayerNorm scales and offsets and position embeddings, a linear warm-up over the first
`warmup` fraction of the steps, then cosine decay to zero (`schedule="cosine"`). `default_recipe`
picks the recipe of a model when `--recipe` is not given: `vit_cifar`/`vit_imagenet` for the
RevViTs, `cifar` for the others.

Learning rate and batch size: `batch_size` is the global batch (summed over all devices and
workers). The learning rate is the recipe's for its own batch size; `Recipe.scaled_to_batch` applies
the linear scaling rule (Goyal et al. 2017, arXiv:1706.02677): `lr * new_batch / recipe_batch`.

References:
    Gomez, Ren, Urtasun, Grosse, "The Reversible Residual Network: Backpropagation Without Storing
    Activations", NeurIPS 2017 (arXiv:1707.04585), Section 6 and Appendix (CIFAR training details).
    Touvron et al., "Training data-efficient image transformers", ICML 2021 (DeiT), Table 9;
    Mangalam et al., "Reversible Vision Transformers", CVPR 2022, Section 4 (DeiT's recipe).
"""

from __future__ import annotations

import dataclasses

from training.errors import StageError

__all__ = [
    "Recipe",
    "RecipeError",
    "RECIPES",
    "default_recipe",
    "get",
    "list_recipes",
    "learning_rate_schedule",
    "make_optimizer",
    "kernel_l2_regularizer",
    "decayed_kernels",
]


class RecipeError(StageError):
    """A recipe field out of range: `parameter` is the field's name."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one training run.

    Args:
        name: str. Name of the preset.
        epochs: int. Number of passes over the training set (or of capped epochs, see
            `steps_per_epoch`).
        batch_size: int. Global batch size.
        learning_rate: float. Initial learning rate of SGD.
        momentum: float. SGD momentum (AdamW's beta_1 with `optimizer="adamw"`).
        nesterov: bool. Whether to use Nesterov momentum.
        weight_decay: float. SGD: L2 coefficient on convolution and dense kernels (see the module
            docstring), the gradient of the penalty is `weight_decay * kernel`. AdamW: the
            decoupled weight decay of the optimizer.
        optimizer: str. `"sgd"` (momentum) or `"adamw"`.
        schedule: str. `"step"` (multiplied by `decay_factor` at `decay_boundaries`) or
            `"cosine"` (cosine decay to zero after the warm-up).
        warmup: float in [0, 1). Fraction of all steps over which the learning rate rises linearly
            from 0 (only with `schedule="cosine"`).
        decay_boundaries: tuple of floats in (0, 1). Fractions of all training steps at which the
            learning rate is multiplied by `decay_factor`.
        decay_factor: float. Multiplier applied at each boundary.
        steps_per_epoch: int or None. Cap on the training steps of each epoch; `None` runs one full
            pass over the training set per epoch.
        train_examples: int or None. Cap on the number of training examples used; `None` uses all.
        test_examples: int or None. Cap on the number of test examples used for validation and the
            final evaluation; `None` uses all.
        augment: bool. Whether to augment the training images (see `preprocessing`).
        preprocessing: str. `"cifar"`: images kept in memory at `image_size` (pad-4 random crop
            and flip when augmenting); `"imagenet"`: JPEGs of any size decoded on the fly,
            random-resized crop to `image_size` and flip for training, resize to
            `image_size * 256 / 224` and centre crop for evaluation.
        image_size: int. Side of the square images the model sees.
        top5: bool. Also report top-5 accuracy.
        description: str. One line shown by `--help`.
    """

    name: str
    epochs: int
    batch_size: int
    learning_rate: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    decay_boundaries: tuple = (0.5, 0.75)
    decay_factor: float = 0.1
    optimizer: str = "sgd"
    schedule: str = "step"
    warmup: float = 0.0
    steps_per_epoch: int | None = None
    train_examples: int | None = None
    test_examples: int | None = None
    augment: bool = True
    preprocessing: str = "cifar"
    image_size: int = 32
    top5: bool = False
    description: str = ""

    def replace(self, **overrides):
        """Returns a copy with the fields in `overrides` that are not `None` replaced.

        Raises:
            RecipeError: if a field name is unknown or a value is out of range.
        """
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise RecipeError(unknown[0], overrides[unknown[0]],
                              f"unknown recipe field; known fields: {', '.join(sorted(fields))}")
        recipe = dataclasses.replace(
            self, **{k: v for k, v in overrides.items() if v is not None}
        )
        recipe.validate()
        return recipe

    def validate(self):
        """Checks value ranges.

        Raises:
            RecipeError: naming the field and the value received.
        """
        for field in ("epochs", "batch_size", "image_size"):
            value = getattr(self, field)
            if value < 1:
                raise RecipeError(field, value, "must be >= 1")
        for field in ("steps_per_epoch", "train_examples", "test_examples"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise RecipeError(field, value, "must be >= 1 or None")
        if self.learning_rate <= 0:
            raise RecipeError("learning_rate", self.learning_rate, "must be > 0")
        if not 0 <= self.momentum < 1:
            raise RecipeError("momentum", self.momentum, "must be in [0, 1)")
        if self.weight_decay < 0:
            raise RecipeError("weight_decay", self.weight_decay, "must be >= 0")
        if self.optimizer not in ("sgd", "adamw"):
            raise RecipeError("optimizer", self.optimizer, "must be 'sgd' or 'adamw'")
        if self.schedule not in ("step", "cosine"):
            raise RecipeError("schedule", self.schedule, "must be 'step' or 'cosine'")
        if not 0 <= self.warmup < 1:
            raise RecipeError("warmup", self.warmup, "must be in [0, 1)")
        if self.preprocessing not in ("cifar", "imagenet"):
            raise RecipeError("preprocessing", self.preprocessing, "must be 'cifar' or 'imagenet'")
        if any(not 0 < b < 1 for b in self.decay_boundaries) or list(
            self.decay_boundaries
        ) != sorted(self.decay_boundaries):
            raise RecipeError("decay_boundaries", self.decay_boundaries,
                              "must be increasing fractions in (0, 1)")

    def scaled_to_batch(self, batch_size):
        """The linear scaling rule: a copy with `batch_size` and `learning_rate * batch_size /
        self.batch_size` (Goyal et al. 2017)."""
        return self.replace(batch_size=batch_size,
                            learning_rate=self.learning_rate * batch_size / self.batch_size)

    def to_dict(self):
        """Returns the recipe as a JSON-serializable dict."""
        config = dataclasses.asdict(self)
        config["decay_boundaries"] = list(self.decay_boundaries)
        return config


RECIPES = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="cifar",
            # The paper: 80K steps of batch 100 on 50K images = 160 epochs; learning rate 0.1
            # divided by 10 at 40K and 60K steps (50% and 75%); momentum 0.9; weight decay 2e-4.
            epochs=160,
            batch_size=100,
            description="the paper's CIFAR recipe: 160 epochs (80K steps) of batch 100, "
            "lr 0.1 /10 at 50% and 75%, momentum 0.9, weight decay 2e-4",
        ),
        Recipe(
            name="quick",
            # A smoke run that finishes in minutes on a CPU: same optimizer, far fewer steps.
            epochs=2,
            batch_size=64,
            learning_rate=0.05,
            steps_per_epoch=50,
            test_examples=1000,
            description="smoke run: 2 epochs of 50 steps of batch 64, lr 0.05, "
            "1000 test images",
        ),
        Recipe(
            name="imagenet",
            # The paper (Section 6.2, following He et al. 2016): SGD momentum 0.9, batch 256,
            # lr 0.1 divided by 10 at epochs 30, 60 and 80 of 90, weight decay 1e-4; standard
            # random-resized crop 224 + flip; evaluation on the centre 224 crop of a 256 resize.
            epochs=90,
            batch_size=256,
            weight_decay=1e-4,
            decay_boundaries=(30 / 90, 60 / 90, 80 / 90),
            preprocessing="imagenet",
            image_size=224,
            top5=True,
            description="ImageNet: 90 epochs of batch 256, lr 0.1 /10 at epochs 30, 60, 80, "
            "momentum 0.9, weight decay 1e-4, random-resized crop 224, top-5",
        ),
        Recipe(
            name="vit_cifar",
            # A ViT from scratch on CIFAR-10 (the usual small-data recipe, without RandAugment,
            # mixup or label smoothing, which this pipeline does not have): AdamW, batch 128,
            # lr 1e-3 warmed up over 5% of the steps then cosine decay, weight decay 0.05.
            epochs=100,
            batch_size=128,
            learning_rate=1e-3,
            weight_decay=0.05,
            optimizer="adamw",
            schedule="cosine",
            warmup=0.05,
            description="RevViT on CIFAR: 100 epochs of batch 128, AdamW lr 1e-3, 5% linear "
            "warm-up then cosine decay, weight decay 0.05, pad-4 crop + flip",
        ),
        Recipe(
            name="vit_imagenet",
            # DeiT (Table 9), which RevViT follows: AdamW lr 5e-4 x batch / 512, weight decay
            # 0.05, 300 epochs, 5 warm-up epochs, cosine decay (no RandAugment, mixup, CutMix,
            # repeated augmentation or label smoothing here).
            epochs=300,
            batch_size=256,
            learning_rate=2.5e-4,
            weight_decay=0.05,
            optimizer="adamw",
            schedule="cosine",
            warmup=5 / 300,
            preprocessing="imagenet",
            image_size=224,
            top5=True,
            description="RevViT on ImageNet (DeiT): 300 epochs of batch 256, AdamW lr 2.5e-4, 5 "
            "warm-up epochs then cosine decay, weight decay 0.05, random-resized crop 224, top-5",
        ),
    )
}

#: The recipe `default_recipe` gives each model that does not train with `cifar` by default.
MODEL_RECIPES = {"RevViTCifar": "vit_cifar", "RevViTSmall": "vit_imagenet",
                 "RevViTBase": "vit_imagenet"}


def default_recipe(model_name):
    """The name of the recipe a model trains with when `--recipe` is not given.

    Args:
        model_name: str. The zoo's name of the model (`"RevViTCifar"`, `"RevNet38"`, ...).

    Returns:
        str: `"vit_cifar"`/`"vit_imagenet"` for the RevViTs, `"cifar"` for the others.
    """
    return MODEL_RECIPES.get(model_name, "cifar")


def list_recipes():
    """Returns the sorted names of the presets."""
    return sorted(RECIPES)


def get(name):
    """Returns the preset called `name`.

    Raises:
        ValueError: if there is no such preset.
    """
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}. Available: {', '.join(list_recipes())}")
    return RECIPES[name]


def learning_rate_schedule(recipe, total_steps):
    """Step-decay schedule of the paper: `lr`, then `lr * f`, `lr * f**2`, ... at the boundaries.

    Args:
        recipe: `Recipe`.
        total_steps: int. Number of optimizer steps of the whole run.

    Returns:
        A `keras.optimizers.schedules.PiecewiseConstantDecay`.
    """
    import keras

    boundaries = sorted({max(1, int(round(b * total_steps))) for b in recipe.decay_boundaries})
    values = [recipe.learning_rate * recipe.decay_factor**i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def cosine_schedule(recipe, total_steps):
    """Linear warm-up from 0 over `recipe.warmup * total_steps` steps, then cosine decay to 0.

    Returns:
        A `keras.optimizers.schedules.CosineDecay`.
    """
    import keras

    warmup_steps = int(round(recipe.warmup * total_steps))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else recipe.learning_rate,
        decay_steps=max(1, total_steps - warmup_steps),
        alpha=0.0,
        warmup_target=recipe.learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


#: Substrings of the variable names AdamW does not decay: biases, LayerNorm scales and offsets,
#: position embeddings (as DeiT and timm; stacked variables keep these names as suffixes).
NO_DECAY_NAMES = ("bias", "gamma", "beta", "position_embedding")


def make_optimizer(recipe, total_steps):
    """The recipe's optimizer and learning-rate schedule.

    `optimizer="sgd"`: SGD with momentum, the step-decay schedule (or cosine); weight decay is
    not part of it but an L2 penalty of the model (`kernel_l2_regularizer`). `optimizer="adamw"`:
    AdamW with the decoupled weight decay `recipe.weight_decay` on every variable except
    `NO_DECAY_NAMES`.

    Args:
        recipe: `Recipe`.
        total_steps: int. Number of optimizer steps of the whole run.

    Returns:
        A `keras.optimizers.SGD` or `keras.optimizers.AdamW`.
    """
    import keras

    schedule = (cosine_schedule(recipe, total_steps) if recipe.schedule == "cosine"
                else learning_rate_schedule(recipe, total_steps))
    if recipe.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=recipe.weight_decay,
                                           beta_1=recipe.momentum)
        optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY_NAMES))
        return optimizer
    return keras.optimizers.SGD(
        learning_rate=schedule,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
    )


def model_weight_decay(recipe):
    """The L2 coefficient the model's kernels carry: the recipe's for SGD, 0 for AdamW (whose
    decay is in the optimizer)."""
    return recipe.weight_decay if recipe.optimizer == "sgd" else 0.0


def kernel_l2_regularizer(weight_decay):
    """The paper's `weight_decay * sum(w**2) / 2` as a Keras regularizer (gradient `wd * w`)."""
    import keras

    return keras.regularizers.L2(weight_decay / 2.0)


def decayed_kernels(model):
    """Paths of the variables of `model` that carry a regularizer (the weight-decay penalty).

    Args:
        model: a built `keras.Model`.

    Returns:
        list of str, e.g. `["revnet_stem_conv/kernel", ..., "revnet_predictions/kernel"]`.
    """
    return [v.path for v in model.trainable_weights if v.regularizer is not None]
