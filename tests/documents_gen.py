"""Real documents made on the fly for tests: PDFs drawn by matplotlib and Pillow, encrypted
with pypdf, emptied; images; a PNG header claiming 50,000 x 50,000 pixels with nothing behind it."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # noqa: E402 - before pyplot, so no display is needed
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.backends.backend_pdf import PdfPages
from PIL import Image, ImageDraw
from pypdf import PdfWriter


def write_report_pdf(path: Path) -> Path:
    """Three pages: text (letter portrait), a table (letter portrait), a line chart (landscape)."""
    with PdfPages(path) as pdf:
        fig = plt.figure(figsize=(8.5, 11))
        fig.text(0.1, 0.9, "Quarterly report", fontsize=24)
        fig.text(0.1, 0.8, "Revenue rose in the third quarter; margins held.", fontsize=12)
        pdf.savefig(fig)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(8.5, 11))
        ax.axis("off")
        ax.set_title("Quarterly Profit Margins")
        ax.table(cellText=[["Q1", "10.2%"], ["Q2", "11.8%"], ["Q3", "12.5%"]], colLabels=["Quarter", "Margin"],
                 loc="center")
        pdf.savefig(fig)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(11, 8.5))
        ax.plot(range(1, 13), [3, 4, 4, 5, 7, 6, 8, 9, 8, 10, 11, 12])
        ax.set_title("Revenue by month")
        pdf.savefig(fig)
        plt.close(fig)
    return path


def write_pillow_pdf(path: Path) -> Path:
    """Two scanned-looking pages at 100 dpi: 400x500 px (288x360 pt) and 300x200 px (216x144 pt)."""
    first = Image.new("RGB", (400, 500), "white")
    first.paste((20, 20, 20), (40, 40, 360, 60))
    second = Image.new("RGB", (300, 200), (230, 230, 255))
    first.save(path, "PDF", resolution=100.0, save_all=True, append_images=[second])
    return path


def write_encrypted_pdf(source: Path, path: Path) -> Path:
    writer = PdfWriter(clone_from=source)
    writer.encrypt(user_password="secret", owner_password="owner", algorithm="RC4-128")  # pure Python
    writer.write(path)
    return path


def write_zero_page_pdf(path: Path) -> Path:
    PdfWriter().write(path)  # a well-formed document whose page tree is empty
    return path


def write_pdf_with_pages(path: Path, sizes_pt: list[tuple[float, float]]) -> Path:
    writer = PdfWriter()
    for width, height in sizes_pt:
        writer.add_blank_page(width=width, height=height)
    writer.write(path)
    return path


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR claiming width x height RGB, an IDAT of a few bytes and IEND:
    a file of ~70 bytes that would decode to width * height * 3 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) \
        + chunk(b"IEND", b"")


def chart_image(width: int = 640, height: int = 480) -> Image.Image:
    """A line chart drawn with Pillow: axes, a rising line, a title bar."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width, 40), fill=(30, 60, 120))
    draw.line((50, height - 40, width - 20, height - 40), fill="black", width=3)
    draw.line((50, 60, 50, height - 40), fill="black", width=3)
    ys = [0.2, 0.35, 0.3, 0.5, 0.65, 0.6, 0.8, 0.9]
    points = [(50 + i * (width - 80) / (len(ys) - 1), height - 40 - y * (height - 120)) for i, y in enumerate(ys)]
    draw.line(points, fill=(200, 30, 30), width=5)
    return image


def photo_image(width: int = 500, height: int = 350, seed: int = 0) -> Image.Image:
    """Smooth colour gradients with noise: photo-like pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def write_mixed_sources(directory: Path) -> Path:
    """report.pdf (3 pages), chart.png, photo.jpg, notes.txt, readme.md."""
    directory.mkdir(parents=True, exist_ok=True)
    write_report_pdf(directory / "report.pdf")
    chart_image().save(directory / "chart.png")
    photo_image().save(directory / "photo.jpg", quality=90)
    (directory / "notes.txt").write_text("Quarterly profit margins rose to 12.5 percent in the third quarter.\n")
    (directory / "readme.md").write_text("# Travel notes\nA photo of the coast at sunset, taken in June.\n")
    return directory
