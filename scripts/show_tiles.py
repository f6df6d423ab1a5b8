"""Draw how dynamic resolution (--max_tiles) cuts an image: the tiles the processor makes, labelled as the model reads
them, and the global view beside them (default: tiling.png here). The README's picture is made by

    python scripts/show_tiles.py --output assets/tiling.png

With no image given it draws a wide scene of small shapes (what a single squeezed view loses).
"""

from __future__ import annotations

import argparse

from PIL import Image, ImageDraw

from processor import cut_tiles, num_views, tile_grid

GAP = 12


def demo_image() -> Image.Image:
    """A 1152x768 scene of shapes a few percent of its height."""
    image = Image.new("RGB", (1152, 768), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    shapes = [((90, 60), "circle", (215, 40, 40)), ((400, 250), "square", (40, 80, 215)),
              ((700, 520), "triangle", (40, 160, 60)), ((1020, 300), "circle", (230, 190, 20)),
              ((250, 650), "triangle", (150, 60, 190))]
    for (x, y), shape, colour in shapes:
        box = (x, y, x + 28, y + 28)
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        elif shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x + 14, y), (x, y + 28), (x + 28, y + 28)], fill=colour)
    return image


def picture(image: Image.Image, max_tiles: int, tile: int) -> Image.Image:
    grid = tile_grid(*image.size, max_tiles, tile)
    rows, cols = grid
    tiles = cut_tiles(image, grid, tile) or [image.resize((tile, tile), Image.BICUBIC)]
    width = cols * (tile + GAP) + (tile + 3 * GAP if num_views(grid) > 1 else 0)
    canvas = Image.new("RGB", (width, rows * (tile + GAP) + 2 * GAP), (235, 235, 235))
    draw = ImageDraw.Draw(canvas)
    for i, piece in enumerate(tiles):
        r, c = divmod(i, cols)
        x, y = c * (tile + GAP), r * (tile + GAP) + 2 * GAP
        canvas.paste(piece, (x, y))
        label = f"<tile {r + 1},{c + 1}>" if num_views(grid) > 1 else "the only view"
        draw.text((x + 4, y - GAP - 4), label, fill=(0, 0, 0))
    if num_views(grid) > 1:  # the whole image squeezed into one view, as without tiling
        x = cols * (tile + GAP) + 2 * GAP
        canvas.paste(image.resize((tile, tile), Image.BICUBIC), (x, 2 * GAP))
        draw.text((x + 4, GAP - 4), "<global>", fill=(0, 0, 0))
    return canvas


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", default=None, help="an image file (default: a wide demo scene)")
    parser.add_argument("--max_tiles", type=int, default=6, help="as the model's --max_tiles")
    parser.add_argument("--tile_size", type=int, default=384, help="the vision tower's input side (SigLIP: 384)")
    parser.add_argument("--output", default="tiling.png", help="where the picture goes")
    args = parser.parse_args(argv)
    image = Image.open(args.image).convert("RGB") if args.image else demo_image()
    grid = tile_grid(*image.size, args.max_tiles, args.tile_size)
    picture(image, args.max_tiles, args.tile_size).save(args.output)
    print(f"{image.size[0]}x{image.size[1]} -> {grid[0]}x{grid[1]} tiles + "
          f"{'a global view' if num_views(grid) > 1 else 'no global view'}: {num_views(grid)} view(s); {args.output}")
    return args.output


if __name__ == "__main__":
    main()
