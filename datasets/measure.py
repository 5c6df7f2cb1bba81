"""Measurements of every object of a label image (0 = background, k = object k), in pixels and, with a
pixel size, in micrometres: what a scientist counting and sizing nuclei, cells or foraminifera reads off
the predictions. scikit-image's `regionprops_table` computes them; circularity is derived from its area and
perimeter (4 pi area / perimeter^2: 1 for a disc, lower for ragged or elongated outlines).
"""

import numpy as np
from skimage.measure import regionprops_table

PROPERTIES = (  # of regionprops_table
    "label",
    "area",
    "perimeter",
    "equivalent_diameter_area",
    "axis_major_length",
    "axis_minor_length",
    "eccentricity",
    "solidity",
    "intensity_mean",
    "centroid",
    "bbox",
)
LENGTHS = ("perimeter", "equivalent_diameter", "major_axis", "minor_axis")  # columns scaled by the pixel size


def grey_intensity(pixels: np.ndarray) -> np.ndarray:
    """The raw intensity an object's mean is taken of: the pixels as stored (16-bit stays 16-bit), the mean
    of the colour channels for RGB (alpha, a 4th channel, left out)."""
    if pixels.ndim == 2:
        return pixels.astype(np.float64, copy=False)
    return pixels[..., :3].astype(np.float64).mean(axis=2)


def circularity(area: float, perimeter: float) -> float:
    """4 pi area / perimeter^2, capped at 1 as ImageJ does: a pixel outline's perimeter estimate runs short
    on small objects (a 4 x 6 rectangle scores 1.18 uncapped). NaN without a perimeter (1-2 pixel objects:
    no outline to judge)."""
    return min(1.0, 4 * np.pi * area / perimeter**2) if perimeter > 0 else float("nan")


def measure_objects(labels: np.ndarray, pixels: np.ndarray, pixel_size_um: float | None = None) -> list[dict]:
    """One dict per object of `labels` (in label order): object_id, area, perimeter, equivalent diameter,
    major/minor axis, eccentricity, solidity, circularity, mean intensity of `pixels`, centroid (x, y) and
    box (x0, y0, x1, y1, exclusive) in pixels; with `pixel_size_um` also area_um2 and the lengths in um."""
    table = regionprops_table(labels, grey_intensity(pixels), properties=PROPERTIES)
    rows = []
    for i in range(len(table["label"])):
        area, perimeter = float(table["area"][i]), float(table["perimeter"][i])
        row = {
            "object_id": int(table["label"][i]),
            "area_px": area,
            "perimeter_px": perimeter,
            "equivalent_diameter_px": float(table["equivalent_diameter_area"][i]),
            "major_axis_px": float(table["axis_major_length"][i]),
            "minor_axis_px": float(table["axis_minor_length"][i]),
            "eccentricity": float(table["eccentricity"][i]),
            "solidity": float(table["solidity"][i]),
            "circularity": circularity(area, perimeter),
            "mean_intensity": float(table["intensity_mean"][i]),
            "centroid_x_px": float(table["centroid-1"][i]),
            "centroid_y_px": float(table["centroid-0"][i]),
            "bbox_x0": int(table["bbox-1"][i]),
            "bbox_y0": int(table["bbox-0"][i]),
            "bbox_x1": int(table["bbox-3"][i]),
            "bbox_y1": int(table["bbox-2"][i]),
        }
        if pixel_size_um:
            row["area_um2"] = area * pixel_size_um**2
            for name in LENGTHS:
                row[f"{name}_um"] = row[f"{name}_px"] * pixel_size_um
            row["centroid_x_um"] = row["centroid_x_px"] * pixel_size_um
            row["centroid_y_um"] = row["centroid_y_px"] * pixel_size_um
        rows.append(row)
    return rows
