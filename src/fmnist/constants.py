"""Single home of the dataset's facts and the pipeline's file names."""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28
INPUT_SHAPE: tuple[int, int, int] = (1, IMAGE_SIZE, IMAGE_SIZE)
TRAIN_IMAGES = 60_000  # Fashion-MNIST's training split, before preprocess draws validation
TEST_IMAGES = 10_000

# Pixels (uint8 0..255) map to [-1, 1] as (x / 255 - MEAN) / STD. Applied inside the model's
# first layer (fmnist.model.Normalize), so every consumer feeds raw 0..255 values.
NORM_MEAN = 0.5
NORM_STD = 0.5

# The four IDX files, keyed by (split, kind). SHA-256 is of the *decompressed* bytes: Debian's
# dataset-fashion-mnist re-gzips the files with other headers, the content is upstream's.
RAW_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
RAW_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz":
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz":
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz":
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz":
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# Byte sizes of upstream's .gz files (Debian's are 23-24 bytes smaller: no file name in the
# header). A download that announces or sends more is refused: a mirror that streams forever.
RAW_GZ_BYTES: dict[str, int] = {
    "train-images-idx3-ubyte.gz": 26_421_880,
    "train-labels-idx1-ubyte.gz": 29_515,
    "t10k-images-idx3-ubyte.gz": 4_422_102,
    "t10k-labels-idx1-ubyte.gz": 5_148,
}

# Byte sizes of the decompressed IDX files (header + one byte per pixel or label): a gzip that
# inflates past them is refused before the rest is read (a gzip bomb in a folder or a mirror).
RAW_BYTES: dict[str, int] = {
    "train-images-idx3-ubyte.gz": 16 + TRAIN_IMAGES * IMAGE_SIZE * IMAGE_SIZE,
    "train-labels-idx1-ubyte.gz": 8 + TRAIN_IMAGES,
    "t10k-images-idx3-ubyte.gz": 16 + TEST_IMAGES * IMAGE_SIZE * IMAGE_SIZE,
    "t10k-labels-idx1-ubyte.gz": 8 + TEST_IMAGES,
}

SPLITS: tuple[str, ...] = ("train", "val", "test")

URL_SCHEMES = ("http", "https")  # the data.sources the download stage fetches; others are refused

PT2_SUFFIX = ".pt2"  # torch.export programs (fmnist.pt2)
ONNX_SUFFIX = ".onnx"  # export.onnx writes one; onnxruntime runs it, fmnist predict does not

# Paths, relative to the repository root; dvc.yaml repeats them (DVC cannot import Python).
PARAMS_FILE = "params.yaml"
RAW_DIR = "data/raw"
PREPARED_FILE = "data/prepared/fashion_mnist.h5"
MODEL_FILE = "models/model.pth"
TRAIN_CHECKPOINT = "checkpoints/train.ckpt"
TRAIN_REPORT_DIR = "reports/train"
TUNE_DIR = "reports/tune"
TUNE_STUDY_DIR = "checkpoints/tune"
EVALUATE_DIR = "reports/evaluate"
# Written by evaluate, read by export: the temperature fitted on the validation split.
CALIBRATION_FILE = "reports/evaluate/calibration.json"
# The range a fitted temperature may take (the fit's search range; model files are checked
# against it too).
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
EXPORT_DIR = "export"
EXPORT_REPORT_DIR = "reports/export"
