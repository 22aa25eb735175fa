"""The paper's architectures as data: units, widths, residual function, stem, and published results.

Every builder in `tf_revnet.models` reads its architecture from `ARCHITECTURES`, and the README's
model table is generated from it, so the numbers live in one place.

References:
    Gomez et al., "The Reversible Residual Network: Backpropagation Without Storing Activations",
    NeurIPS 2017 (arXiv:1707.04585): Table 1 (architectures and parameter counts), Table 2 (CIFAR
    errors), Table 3 (ImageNet top-1 error); the authors' configurations in
    github.com/renmengye/revnet-public (`resnet/configs/cifar_configs.py`, `imagenet_configs.py`).
"""

import dataclasses

CIFAR_STRIDES = (1, 2, 2)
IMAGENET_STRIDES = (1, 2, 2, 2)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One model of the zoo.

    Attributes:
        name: str. The builder's name, e.g. `"RevNet38"`.
        reversible: bool. RevNet (`True`) or its ResNet baseline (`False`).
        units: tuple of int. Residual units per stage.
        widths: tuple of int. `[stem, stage 1, stage 2, ...]` channels; a bottleneck stage outputs 4
            times its width.
        residual_function: str. `"basic"` or `"bottleneck"`.
        strides: tuple of int. Stride of the first unit of each stage.
        stem: str. `"cifar"` (3x3 convolution) or `"imagenet"` (7x7 stride-2 convolution, max
            pooling).
        paper_params: float or None. Parameters in the paper's Table 1, in millions.
        paper_errors: dict. The paper's error (%), keyed by dataset: `"cifar10"`, `"cifar100"`
            (Table 2) or `"imagenet"` (top-1, Table 3).
        params: int. `count_params()` of our model with `classes` classes (BatchNorm moving
            statistics included); the tests check it.
        trainable_params: int. Its trainable parameters.
        note: str. A remark for the builder's docstring.
    """

    name: str
    reversible: bool
    units: tuple
    widths: tuple
    residual_function: str
    strides: tuple
    stem: str
    paper_params: float = None
    paper_errors: dict = dataclasses.field(default_factory=dict)
    params: int = 0
    trainable_params: int = 0
    note: str = ""

    @property
    def classes(self):
        """Classes of the standard classifier: 10 (CIFAR-10) or 1000 (ImageNet)."""
        return 10 if self.stem == "cifar" else 1000

    @property
    def input_shape(self):
        """The paper's input shape (NHWC without the batch): 32x32 or 224x224 RGB."""
        return (32, 32, 3) if self.stem == "cifar" else (224, 224, 3)

    @property
    def depth(self):
        """Weighted layers: stem, each convolution of each residual function, classifier."""
        convs = 2 if self.residual_function == "basic" else 3
        functions_per_unit = 2 if self.reversible else 1
        return 2 + convs * functions_per_unit * sum(self.units)


ARCHITECTURES = {
    spec.name: spec
    for spec in [
        Architecture(
            "RevNet38", True, (3, 3, 3), (32, 32, 64, 112), "basic", CIFAR_STRIDES, "cifar",
            paper_params=0.46, paper_errors={"cifar10": 7.24, "cifar100": 28.96},
            params=467_562, trainable_params=464_890,
        ),
        Architecture(
            "RevNet110", True, (9, 9, 9), (32, 32, 64, 128), "basic", CIFAR_STRIDES, "cifar",
            paper_params=1.73, paper_errors={"cifar10": 5.76, "cifar100": 25.40},
            params=1_737_450, trainable_params=1_729_194,
        ),
        Architecture(
            "RevNet164", True, (9, 9, 9), (32, 32, 64, 128), "bottleneck", CIFAR_STRIDES, "cifar",
            paper_params=1.75, paper_errors={"cifar10": 5.17, "cifar100": 23.69},
            params=1_773_546, trainable_params=1_748_778,
        ),
        Architecture(
            "RevNet56", True, (2, 2, 3, 2), (128, 128, 256, 512, 832), "bottleneck",
            IMAGENET_STRIDES, "imagenet",
            params=27_604_328, trainable_params=27_553_128,
            note=(
                "This model is not in the paper's tables: it is the smaller ImageNet RevNet of the "
                "authors' code (configuration `revnet-54` there; 56 weighted layers counted as for "
                "the other models)."
            ),
        ),
        Architecture(
            "RevNet104", True, (2, 2, 11, 2), (128, 128, 256, 512, 832), "bottleneck",
            IMAGENET_STRIDES, "imagenet", paper_params=45.2, paper_errors={"imagenet": 23.10},
            params=45_528_424, trainable_params=45_428_072,
        ),
        Architecture(
            "ResNet32", False, (5, 5, 5), (16, 16, 32, 64), "basic", CIFAR_STRIDES, "cifar",
            paper_params=0.46, paper_errors={"cifar10": 7.14, "cifar100": 29.95},
            params=466_426, trainable_params=464_154,
        ),
        Architecture(
            "ResNet110", False, (18, 18, 18), (16, 16, 32, 64), "basic", CIFAR_STRIDES, "cifar",
            paper_params=1.73, paper_errors={"cifar10": 5.74, "cifar100": 26.44},
            params=1_736_058, trainable_params=1_727_962,
        ),
        Architecture(
            "ResNet164", False, (18, 18, 18), (16, 16, 32, 64), "bottleneck", CIFAR_STRIDES,
            "cifar", paper_params=1.70, paper_errors={"cifar10": 5.24, "cifar100": 23.37},
            params=1_727_482, trainable_params=1_703_258,
        ),
        Architecture(
            "ResNet101", False, (3, 4, 23, 3), (64, 64, 128, 256, 512), "bottleneck",
            IMAGENET_STRIDES, "imagenet", paper_params=44.5, paper_errors={"imagenet": 23.01},
            params=44_639_144, trainable_params=44_541_480,
        ),
    ]
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ViTArchitecture:
    """One reversible vision transformer of the zoo (`tf_revnet.models.RevViT`).

    Attributes:
        name: str. The builder's name, e.g. `"RevViTSmall"`.
        patch_size: int. Side of the square patches.
        embed_dim: int. Token width C of each of the two streams.
        depth: int. Reversible blocks (each one attention F and one MLP G).
        num_heads: int. Attention heads.
        mlp_ratio: float. MLP hidden width over C.
        image_size: int. Side of the square input images.
        classes: int. Classes of the standard classifier.
        paper_params: float or None. Published parameter count, in millions.
        params: int. `count_params()` of our model with `classes` classes; the tests check it.
        note: str. A remark for the builder's docstring.
    """

    name: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    image_size: int
    classes: int
    paper_params: float = None
    params: int = 0
    note: str = ""

    @property
    def input_shape(self):
        """The input shape (NHWC without the batch)."""
        return (self.image_size, self.image_size, 3)

    @property
    def num_tokens(self):
        """Tokens per image: `(image_size / patch_size)^2`."""
        return (self.image_size // self.patch_size) ** 2


#: RevViT-S and RevViT-B: Mangalam et al., "Reversible Vision Transformers", CVPR 2022, Table 1
#: (DeiT-S/B sizes at 224x224, patch 16); the published counts are mmpretrain's model zoo
#: (`configs/revvit/`: 22.4M and 87.3M with 1000 classes). `RevViTCifar` is our CIFAR-size model.
VIT_ARCHITECTURES = {
    spec.name: spec
    for spec in [
        ViTArchitecture("RevViTSmall", 16, 384, 12, 6, 4.0, 224, 1000, paper_params=22.4,
                        params=22_434_664),
        ViTArchitecture("RevViTBase", 16, 768, 12, 12, 4.0, 224, 1000, paper_params=87.3,
                        params=87_335_656),
        ViTArchitecture(
            "RevViTCifar", 4, 192, 6, 3, 4.0, 32, 10, params=2_695_498,
            note="A CIFAR-size model of ours (not in the paper): 4x4 patches of a 32x32 image, 64 "
                 "tokens, ViT-Tiny's width and heads at half its depth, small enough to train on "
                 "a CPU.",
        ),
    ]
}  # fmt: skip

def markdown_table():
    """The README's model table (Markdown), generated from `ARCHITECTURES`.

    "Parameters" is `count_params()` of the built model with the standard classifier (BatchNorm
    moving statistics included), "Trainable" its trainable part; the tests check both against the
    code.
    Errors are the paper's (Tables 2 and 3), in percent.

    Returns:
        str: a Markdown table, one row per model, ending with a newline.
    """

    def error(arch, key):
        value = arch.paper_errors.get(key)
        return "-" if value is None else f"{value:.2f}"

    rows = [
        "| Model | Depth | Residual function | Units per stage | Widths | Parameters | Trainable | "
        "Paper (Table 1) | CIFAR-10 error (%) | CIFAR-100 error (%) | ImageNet top-1 error (%) |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arch in ARCHITECTURES.values():
        paper = "-" if arch.paper_params is None else f"{arch.paper_params:.2f}M"
        rows.append(
            f"| `{arch.name}` | {arch.depth} | {arch.residual_function} | "
            f"{'-'.join(map(str, arch.units))} | {'-'.join(map(str, arch.widths))} | "
            f"{arch.params:,} | {arch.trainable_params:,} | {paper} | {error(arch, 'cifar10')} | "
            f"{error(arch, 'cifar100')} | {error(arch, 'imagenet')} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m tf_revnet.models.architectures > table.md
    print(markdown_table(), end="")
