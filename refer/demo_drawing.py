"""Drawing the demo's overhead scenes: textured ground with roads, and each of the 20 RRSIS-D classes as a
function (canvas, centre, radius, angle, rng) -> outline polygon [K, 2]. Shapes are given in unit
coordinates (within radius 1) and placed by `_place`; `draw_object` puts one inside a cell of the 3 x 3
grid on which refer.demo_data reads positions."""
import cv2
import numpy as np

GRID = 3  # positions are read on a 3 x 3 grid of the image


def _place(points, cx, cy, r, angle):
    points = np.asarray(points, dtype=np.float64) * r
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]]) + (cx, cy)


def _fill(img, poly, color):
    cv2.fillPoly(img, [np.round(poly).astype(np.int32)], color, lineType=cv2.LINE_AA)


def _line(img, p, q, color, thickness=1):
    cv2.line(img, tuple(int(round(v)) for v in p), tuple(int(round(v)) for v in q), color, thickness,
             lineType=cv2.LINE_AA)


def _ellipse(a, b, n=28):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([a * np.cos(t), b * np.sin(t)], 1)


def _rect(w, h):
    return np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2


def _jitter(rng, color, amount=18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def _water(img, cx, cy, r, angle, rng):
    _fill(img, _place(_ellipse(1.15, 0.8), cx, cy, r, angle), _jitter(rng, (48, 78, 98), 10))


def draw_service_area(img, cx, cy, r, a, rng):
    poly = _place(_rect(1.5, 1.1), cx, cy, r, a)
    _fill(img, poly, _jitter(rng, (150, 150, 145)))
    _fill(img, _place(_rect(0.5, 0.35) + (-0.4, -0.2), cx, cy, r, a), _jitter(rng, (90, 80, 75)))
    for i in range(4):  # parked cars
        for j in range(3):
            dot = _place([[0.1 + 0.15 * i, 0.05 + 0.14 * j]], cx, cy, r, a)[0]
            cv2.circle(img, (int(dot[0]), int(dot[1])), max(1, int(r * 0.04)),
                       tuple(int(v) for v in rng.integers(40, 255, 3)), -1)
    return poly


def draw_toll_station(img, cx, cy, r, a, rng):
    poly = _place(_rect(1.7, 0.6), cx, cy, r, a)
    _fill(img, poly, _jitter(rng, (70, 70, 75)))
    for x in np.linspace(-0.65, 0.65, 6):
        _line(img, *_place([[x, -0.25], [x, 0.25]], cx, cy, r, a), (235, 235, 235), max(1, int(r * 0.06)))
    _line(img, *_place([[-0.85, 0], [0.85, 0]], cx, cy, r, a), (200, 60, 50), max(1, int(r * 0.05)))
    return poly


def draw_airplane(img, cx, cy, r, a, rng):
    shape = [[-.08, -1], [.08, -1], [.08, -.25], [.9, .05], [.9, .2], [.08, .1], [.08, .7], [.35, .9],
             [.35, 1], [-.35, 1], [-.35, .9], [-.08, .7], [-.08, .1], [-.9, .2], [-.9, .05], [-.08, -.25]]
    _fill(img, _place(shape, cx + r * 0.08, cy + r * 0.08, r, a), (60, 60, 60))  # shadow
    poly = _place(shape, cx, cy, r, a)
    _fill(img, poly, _jitter(rng, (238, 238, 240), 10))
    return poly


def draw_airport(img, cx, cy, r, a, rng):
    poly = _place(_rect(1.9, 0.9), cx, cy, r, a)
    _fill(img, poly, _jitter(rng, (165, 165, 160)))
    _fill(img, _place(_rect(1.8, 0.22), cx, cy, r, a), (55, 55, 58))  # runway
    for x in np.linspace(-0.7, 0.7, 5):
        _line(img, *_place([[x - 0.06, 0], [x + 0.06, 0]], cx, cy, r, a), (250, 250, 250), 1)
    return poly


def draw_baseball_field(img, cx, cy, r, a, rng):
    t = np.linspace(0, np.pi / 2, 14)
    fan = np.concatenate([[[0, 0]], np.stack([np.cos(t), np.sin(t)], 1) * 1.3]) - (0.45, 0.45)
    poly = _place(fan, cx, cy, r, a)
    _fill(img, poly, _jitter(rng, (70, 140, 60)))
    diamond = np.array([[0, 0], [0.55, 0], [0.55, 0.55], [0, 0.55]]) - (0.4, 0.4)
    _fill(img, _place(diamond, cx, cy, r, a), _jitter(rng, (190, 140, 90)))
    return poly


def draw_basketball_court(img, cx, cy, r, a, rng):
    poly = _place(_rect(1.5, 0.85), cx, cy, r, a)
    _fill(img, poly, _jitter(rng, (60, 110, 185) if rng.random() < 0.5 else (205, 120, 60)))
    _line(img, *_place([[0, -0.42], [0, 0.42]], cx, cy, r, a), (245, 245, 245), 1)
    centre = _place([[0, 0]], cx, cy, r, a)[0]
    cv2.circle(img, (int(centre[0]), int(centre[1])), max(1, int(r * 0.18)), (245, 245, 245), 1)
    return poly


def draw_bridge(img, cx, cy, r, a, rng):
    _fill(img, _place(_rect(0.9, 2.0), cx, cy, r, a), _jitter(rng, (48, 78, 98), 10))  # river
    poly = _place(_rect(1.95, 0.32), cx, cy, r, a)
    _fill(img, poly, _jitter(rng, (205, 195, 170)))
    for y in (-0.16, 0.16):
        _line(img, *_place([[-0.97, y], [0.97, y]], cx, cy, r, a), (110, 105, 95), 1)
    return poly


def draw_chimney(img, cx, cy, r, a, rng):
    _line(img, (cx, cy), _place([[1.0, 0.3]], cx, cy, r, 0)[0], (35, 35, 35), max(1, int(r * 0.12)))  # shadow
    poly = _place(_ellipse(0.28, 0.28, 16), cx, cy, r, 0)
    _fill(img, poly, _jitter(rng, (120, 60, 50)))
    cv2.circle(img, (int(cx), int(cy)), max(1, int(r * 0.12)), (25, 25, 25), -1)
    return poly


def draw_dam(img, cx, cy, r, a, rng):
    _fill(img, _place(_rect(2.0, 1.0) + (0, -0.5), cx, cy, r, a), _jitter(rng, (45, 80, 105), 10))  # reservoir
    poly = _place([[-1, -0.1], [1, -0.1], [0.9, 0.25], [-0.9, 0.25]], cx, cy, r, a)
    _fill(img, poly, _jitter(rng, (200, 200, 195)))
    return poly


def draw_golf_field(img, cx, cy, r, a, rng):
    t = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    radius = 0.95 * (1 + 0.15 * np.sin(3 * t + rng.uniform(0, 6))) / 1.15
    poly = _place(np.stack([radius * np.cos(t), radius * np.sin(t)], 1), cx, cy, r, a)
    _fill(img, poly, _jitter(rng, (120, 185, 90)))
    for _ in range(3):  # bunkers and greens
        p = _place([rng.uniform(-0.4, 0.4, 2)], cx, cy, r, a)[0]
        color = (225, 215, 160) if rng.random() < 0.5 else (60, 130, 55)
        cv2.circle(img, (int(p[0]), int(p[1])), max(1, int(r * 0.1)), color, -1)
    return poly


def _stadium_shape(w, h, n=10):
    t = np.linspace(-np.pi / 2, np.pi / 2, n)
    right = np.stack([w / 2 - h / 2 + h / 2 * np.cos(t), h / 2 * np.sin(t)], 1)
    return np.concatenate([right, -right])


def draw_track_field(img, cx, cy, r, a, rng):
    poly = _place(_stadium_shape(1.9, 1.1), cx, cy, r, a)
    _fill(img, poly, _jitter(rng, (175, 80, 60)))
    _fill(img, _place(_stadium_shape(1.5, 0.7), cx, cy, r, a), _jitter(rng, (80, 150, 70)))
    return poly


def draw_harbor(img, cx, cy, r, a, rng):
    _water(img, cx, cy, r, a, rng)
    comb = [[-0.95, -0.6], [0.95, -0.6], [0.95, -0.35], [0.75, -0.35], [0.75, 0.6], [0.55, 0.6],
            [0.55, -0.35], [0.1, -0.35], [0.1, 0.6], [-0.1, 0.6], [-0.1, -0.35], [-0.55, -0.35],
            [-0.55, 0.6], [-0.75, 0.6], [-0.75, -0.35], [-0.95, -0.35]]
    poly = _place(comb, cx, cy, r, a)
    _fill(img, poly, _jitter(rng, (215, 210, 200)))
    return poly


def draw_overpass(img, cx, cy, r, a, rng):
    w = 0.16
    cross = [[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1], [-w, w], [-1, w],
             [-1, -w], [-w, -w]]
    poly = _place(cross, cx, cy, r, a + np.pi / 4)
    _fill(img, poly, _jitter(rng, (175, 172, 165)))
    _line(img, *_place([[-0.95, 0], [0.95, 0]], cx, cy, r, a + np.pi / 4), (240, 220, 90), 1)
    return poly


def draw_ship(img, cx, cy, r, a, rng):
    _water(img, cx, cy, r, a + np.pi / 2, rng)
    hull = [[0, -1], [0.2, -0.55], [0.2, 0.9], [-0.2, 0.9], [-0.2, -0.55]]
    poly = _place(hull, cx, cy, r, a)
    _fill(img, poly, _jitter(rng, (235, 235, 230), 10))
    _fill(img, _place(_rect(0.22, 0.35) + (0, 0.4), cx, cy, r, a), _jitter(rng, (190, 90, 60)))
    return poly


def draw_stadium(img, cx, cy, r, a, rng):
    poly = _place(_ellipse(1.0, 0.8), cx, cy, r, a)
    _fill(img, poly, _jitter(rng, (215, 215, 220)))
    _fill(img, _place(_ellipse(0.6, 0.42), cx, cy, r, a), _jitter(rng, (50, 155, 65)))
    return poly


def draw_storage_tank(img, cx, cy, r, a, rng):
    cv2.circle(img, (int(cx + r * 0.12), int(cy + r * 0.12)), int(r * 0.6), (55, 55, 55), -1)  # shadow
    poly = _place(_ellipse(0.6, 0.6), cx, cy, r, 0)
    _fill(img, poly, _jitter(rng, (232, 232, 225), 10))
    cv2.circle(img, (int(cx), int(cy)), max(1, int(r * 0.38)), (120, 120, 120), 1, lineType=cv2.LINE_AA)
    return poly


def draw_tennis_court(img, cx, cy, r, a, rng):
    poly = _place(_rect(1.5, 0.8), cx, cy, r, a)
    _fill(img, poly, _jitter(rng, (50, 125, 80)))
    inner = _place(_rect(1.2, 0.55), cx, cy, r, a)
    cv2.polylines(img, [np.round(inner).astype(np.int32)], True, (245, 245, 245), 1)
    _line(img, *_place([[0, -0.28], [0, 0.28]], cx, cy, r, a), (245, 245, 245), 1)
    return poly


def draw_train_station(img, cx, cy, r, a, rng):
    poly = _place(_rect(1.95, 0.7), cx, cy, r, a)
    _fill(img, poly, _jitter(rng, (85, 95, 130)))
    for y in np.linspace(-0.22, 0.22, 4):  # tracks under the roofs
        _line(img, *_place([[-0.95, y], [0.95, y]], cx, cy, r, a), (45, 40, 40), 1)
    return poly


def draw_vehicle(img, cx, cy, r, a, rng):
    poly = _place(_rect(0.9, 0.45), cx, cy, r, a)
    palette = [(220, 30, 30), (240, 240, 240), (30, 30, 30), (40, 80, 200), (230, 200, 40), (150, 150, 150)]
    _fill(img, poly, palette[rng.integers(len(palette))])
    _fill(img, _place(_rect(0.3, 0.35), cx, cy, r, a), (25, 35, 45))  # windscreen
    return poly


def draw_windmill(img, cx, cy, r, a, rng):
    spokes = a + np.array([0, 2, 4]) * np.pi / 3
    points = []
    for t in spokes:
        for d, rad in ((-0.45, 0.12), (0, 1.0), (0.45, 0.12)):
            points.append([rad * np.cos(t + d * (rad < 1)), rad * np.sin(t + d * (rad < 1))])
    shape = np.array(points)
    _fill(img, _place(shape, cx + r * 0.15, cy + r * 0.1, r, 0), (70, 70, 70))  # shadow
    poly = _place(shape, cx, cy, r, 0)
    _fill(img, poly, _jitter(rng, (245, 245, 245), 8))
    return poly


DRAWERS = [draw_service_area, draw_toll_station, draw_airplane, draw_airport, draw_baseball_field,
           draw_basketball_court, draw_bridge, draw_chimney, draw_dam, draw_golf_field, draw_track_field,
           draw_harbor, draw_overpass, draw_ship, draw_stadium, draw_storage_tank, draw_tennis_court,
           draw_train_station, draw_vehicle, draw_windmill]
# relative size of each class inside its grid cell (vehicles and chimneys are small)
CLASS_SCALE = np.array([1.0, 0.9, 0.9, 1.0, 1.0, 0.8, 1.0, 0.6, 1.0, 1.0, 1.0, 1.0,
                        1.0, 0.8, 1.0, 0.75, 0.8, 1.0, 0.55, 0.9])


def draw_ground(size, rng):
    """Textured ground: a base tone, low-frequency blotches, a gradient, grain and a few roads."""
    base = np.array([(120, 110, 85), (105, 120, 80), (135, 125, 105), (110, 105, 100)][rng.integers(4)], float)
    # blotches mostly vary brightness; a little tint keeps it from looking flat
    blotches = rng.normal(0, 1, (5, 5, 1)) + 0.25 * rng.normal(0, 1, (5, 5, 3))
    blotches = cv2.resize(blotches, (size, size), interpolation=cv2.INTER_CUBIC)
    ramp = np.linspace(-1, 1, size)
    gx, gy = rng.normal(0, 1, 2)
    gradient = (gx * ramp[None, :] + gy * ramp[:, None])[..., None]
    img = base + 14 * blotches + 8 * gradient + rng.normal(0, 5, (size, size, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(0, 3)):
        p, q = rng.uniform(0, size, (2, 2))
        cv2.line(img, tuple(int(v) for v in p), tuple(int(v) for v in q), _jitter(rng, (95, 95, 95), 10),
                 max(1, size // 48), lineType=cv2.LINE_AA)
    return img


def draw_object(img, category_id, cell, size, scale, rng):
    """Draw one object inside grid cell (row, col); returns its outline polygon [K, 2]."""
    cell_px = size / GRID
    r = 0.45 * cell_px * scale * CLASS_SCALE[category_id]
    row, col = cell
    cx = (col + 0.5) * cell_px + rng.uniform(-1, 1) * max(0.0, 0.5 * cell_px - r)
    cy = (row + 0.5) * cell_px + rng.uniform(-1, 1) * max(0.0, 0.5 * cell_px - r)
    poly = DRAWERS[category_id](img, cx, cy, r, rng.uniform(0, np.pi), rng)
    return np.clip(poly, 0, size - 1)
