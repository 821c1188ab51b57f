"""Metadata vocabulary of the synthetic atlas: real ontology terms, so synthetic obs look like Census obs.

Labels follow the CELLxGENE ontology guide's current labels (checked against
``cellxgene_ontology_guide`` in tests/test_synth.py). Marker genes are real symbols; they give each
cell type a recognisable program in the shared Ensembl gene space.
"""

from __future__ import annotations

# (label, CL id, marker gene symbols)
CELL_TYPES = [
    ("B cell", "CL:0000236", ["MS4A1", "CD79A", "CD79B", "CD19", "PAX5"]),
    ("CD4-positive, alpha-beta T cell", "CL:0000624", ["CD3E", "CD3D", "CD4", "IL7R", "CCR7"]),
    ("CD8-positive, alpha-beta T cell", "CL:0000625", ["CD3E", "CD3D", "CD8A", "CD8B", "GZMK"]),
    ("natural killer cell", "CL:0000623", ["NKG7", "GNLY", "KLRD1", "NCAM1", "PRF1"]),
    ("classical monocyte", "CL:0000860", ["CD14", "LYZ", "S100A8", "S100A9", "FCN1"]),
    ("fibroblast", "CL:0000057", ["COL1A1", "COL1A2", "DCN", "LUM", "PDGFRA"]),
    ("endothelial cell", "CL:0000115", ["PECAM1", "VWF", "CDH5", "CLDN5", "KDR"]),
    ("hepatocyte", "CL:0000182", ["ALB", "APOA1", "TTR", "SERPINA1", "APOB"]),
]

# (tissue label, UBERON id, indices into CELL_TYPES that occur there). tissue_general equals the
# tissue for these organs (as in Census).
TISSUES = [
    ("blood", "UBERON:0000178", [0, 1, 2, 3, 4]),
    ("spleen", "UBERON:0002106", [0, 1, 2, 3, 4, 6]),
    ("lung", "UBERON:0002048", [0, 1, 2, 3, 4, 5, 6]),
    ("liver", "UBERON:0002107", [3, 4, 5, 6, 7]),
    ("heart", "UBERON:0000948", [4, 5, 6]),
]

# (label, EFO id, relative library size): plate-based Smart-seq2 sequences deeper.
ASSAYS = [
    ("10x 3' v3", "EFO:0009922", 1.0),
    ("10x 3' v2", "EFO:0009899", 0.6),
    ("10x 5' v1", "EFO:0011025", 0.7),
    ("10x 5' v2", "EFO:0009900", 0.9),
    ("Smart-seq2", "EFO:0008931", 1.8),
]

DISEASES = [
    ("normal", "PATO:0000461"),
    ("COVID-19", "MONDO:0100096"),
    ("type 2 diabetes mellitus", "MONDO:0005148"),
    ("lung adenocarcinoma", "MONDO:0005061"),
]
DISEASE_WEIGHTS = [0.7, 0.1, 0.1, 0.1]

SEXES = [("female", "PATO:0000383"), ("male", "PATO:0000384")]

DEVELOPMENT_STAGES = [
    ("adult stage", "HsapDv:0000087"),
    ("middle aged stage", "HsapDv:0000092"),
    ("sixth decade stage", "HsapDv:0000240"),
    ("56-year-old stage", "HsapDv:0000150"),
]

ETHNICITIES = [
    ("European ancestry", "HANCESTRO:0005"),
    ("African ancestry", "HANCESTRO:0010"),
    ("Asian ancestry", "HANCESTRO:0008"),
    ("unknown", "unknown"),
]

SUSPENSION_TYPE = "cell"
TISSUE_TYPE = "tissue"


def all_marker_symbols() -> list[str]:
    seen: dict[str, None] = {}
    for _, _, markers in CELL_TYPES:
        for m in markers:
            seen[m] = None
    return list(seen)
