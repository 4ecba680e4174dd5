"""The screenshot of `sonodistill app` in docs/point_of_care.md, taken in headless Chromium.

Serves the app on a free port of 127.0.0.1 with the given model folder, opens it in Debian's
chromium (through chromedriver, as tests/test_app.py does), uploads FILE, waits until its
frames are predicted, pauses on a frame and saves the window as a PNG. Usage:
    python scripts/app_screenshot.py --model runs/export_r18 --file IMAGE_OR_CINE \
        --out docs/point_of_care_app.png [--backend ort_int8] [--frame 10]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from sonodistill.deploy.app.server import AppConfig, bind, server
from sonodistill.io import write_bytes

CHROME_FLAGS = [
    *("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars"),
    *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
    "--window-size=1280,1060",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--file", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backend", default="")
    parser.add_argument("--frame", type=int, default=None, help="pause on this frame")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with tempfile.TemporaryDirectory() as tmp:
        cfg = AppConfig(models=[str(args.model)], work_dir=tmp, threads=args.threads)
        sock = bind("127.0.0.1", 0)
        instance = server(cfg)
        thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not instance.started:
            time.sleep(0.05)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp}/profile"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        text = lambda element_id: driver.find_element(By.ID, element_id).text  # noqa: E731
        try:
            driver.get(f"http://127.0.0.1:{sock.getsockname()[1]}")
            wait = WebDriverWait(driver, 300)
            wait.until(lambda d: text("status") == "Choose a file.")
            if args.backend:
                Select(driver.find_element(By.ID, "backend")).select_by_value(args.backend)
            driver.find_element(By.ID, "file").send_keys(str(args.file.resolve()))
            wait.until(lambda d: text("status").startswith(("Done", "Failed", "Refused")))
            if not text("status").startswith("Done"):
                raise SystemExit(f"app: {text('status')}")
            if args.frame is not None and driver.find_element(By.ID, "play").is_enabled():
                if driver.find_element(By.ID, "play").text == "Pause":
                    driver.find_element(By.ID, "play").click()
                seek = driver.find_element(By.ID, "seek")
                driver.execute_script(
                    "arguments[0].value = arguments[1];"
                    "arguments[0].dispatchEvent(new Event('input'));",
                    seek,
                    args.frame,
                )
            time.sleep(1.0)  # let the canvas draw
            write_bytes(args.out, driver.get_screenshot_as_png())
            print(f"{args.out}: {text('status')} | {text('latency')} | {text('area')}")
        finally:
            driver.quit()
            instance.should_exit = True
            thread.join(10)


if __name__ == "__main__":
    main()
