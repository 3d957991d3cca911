"""HL7 v2 ORU^R01 lab results over MLLP: parse, acknowledge, store.

The listener (:class:`MllpServer`, asyncio) accepts MLLP-framed messages
(``<VT> message <FS><CR>``) on a loopback port by default. Each message is
handled in a worker thread (the event loop never blocks on the database):

* **AR** (application reject): not an HL7 v2 message, a message type other
  than ORU^R01, no message control ID (MSH-10), or the database could not
  store it (the sender should retry).
* **AE** (application error): the content is unusable: no patient identifier
  (PID-3), no result (OBX), an OBX without LOINC code, a non-numeric NM value,
  a unit that cannot express the analyte, no observation time (OBX-14 or OBR-7).
  The reason names the segment.
* **AA**: stored. A message whose control ID was already accepted is
  acknowledged AA again without storing anything twice.

A message is stored in one transaction: all of its results or none. Each
message (control ID, type, acknowledgement, reason; no patient data) is logged
in ``hl7_messages``. Times without a UTC offset are read in ``timezone``.

Only results with status F (final) or C (corrected) are stored; others
(P preliminary, X, D, ...) are counted and skipped, as are structured numeric
(SN) results with a comparator ("<5": no exact value). Result codes must be LOINC
(``LN`` coding system, or a LOINC-shaped code); results outside the lab panel
are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import hl7
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from node.clinical.store import Hl7Message, LabRecord, NoteRecord, store_batch
from node.errors import ClinicalDataError

log = logging.getLogger(__name__)

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"
ACCEPT, ERROR, REJECT = "AA", "AE", "AR"
_LOINC = re.compile(r"^\d{1,7}-\d$")


class Hl7Refusal(Exception):
    """A message that is answered AE or AR; ``code`` and ``reason`` go into MSA."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class Segment:
    name: str
    fields: list[str]  # fields[1] is the first field after the name (MSH: MSH-1 = "|")

    def get(self, n: int, comp: int = 1, rep: int = 1, sub: int = 1, enc: str = "^~\\&") -> str:
        if n >= len(self.fields):
            return ""
        reps = self.fields[n].split(enc[1])
        if rep > len(reps):
            return ""
        comps = reps[rep - 1].split(enc[0])
        if comp > len(comps):
            return ""
        subs = comps[comp - 1].split(enc[3])
        return subs[sub - 1].strip() if sub <= len(subs) else ""

    def repetitions(self, n: int, enc: str = "^~\\&") -> int:
        return len(self.fields[n].split(enc[1])) if n < len(self.fields) else 0


@dataclass
class OruMessage:
    control_id: str
    message_type: str
    sending_app: str
    sending_facility: str
    labs: list[LabRecord] = field(default_factory=list)
    notes: list[NoteRecord] = field(default_factory=list)
    skipped: int = 0


def _segments(text: str) -> tuple[list[Segment], str]:
    lines = [ln for ln in re.split(r"\r\n|\r|\n", text.strip()) if ln.strip()]
    if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 8:
        raise Hl7Refusal(REJECT, "not an HL7 v2 message (must start with an MSH segment)")
    sep = lines[0][3]
    enc = lines[0][4:8]
    try:
        hl7.parse("\r".join(lines))
    except Exception as exc:  # the hl7 parser raises several kinds on garbage
        raise Hl7Refusal(REJECT, f"message cannot be parsed as HL7 v2: {exc}") from exc
    segs: list[Segment] = []
    for ln in lines:
        parts = ln.split(sep)
        if parts[0] == "MSH":
            parts = ["MSH", sep, *parts[1:]]
        segs.append(Segment(parts[0], parts))
    return segs, enc


def parse_ts(value: str, tz: ZoneInfo) -> datetime | None:
    """HL7 TS/DTM (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]) as an aware datetime."""
    m = re.fullmatch(
        r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?([+-]\d{4})?", value
    )
    if not m:
        return None
    y, mo, d, h, mi, s, off = m.groups()
    try:
        dt = datetime(int(y), int(mo or 1), int(d or 1), int(h or 0), int(mi or 0), int(s or 0))
    except ValueError:
        return None
    if off:
        sign = 1 if off[0] == "+" else -1
        minutes = sign * (int(off[1:3]) * 60 + int(off[3:5]))
        return dt.replace(tzinfo=timezone(timedelta(minutes=minutes))).astimezone(UTC)
    return dt.replace(tzinfo=tz).astimezone(UTC)


def parse_oru(text: str, tz: ZoneInfo | None = None) -> OruMessage:
    """Parse an ORU^R01 into lab records; raise :class:`Hl7Refusal` (AE/AR) with a reason."""
    zone = tz or ZoneInfo("UTC")
    segs, enc = _segments(text)
    msh = segs[0]
    mtype = f"{msh.get(9, 1, enc=enc)}^{msh.get(9, 2, enc=enc)}"
    control = msh.get(10, enc=enc)
    if not control:
        raise Hl7Refusal(REJECT, "MSH-10 (message control ID) is empty")
    if mtype != "ORU^R01":
        raise Hl7Refusal(REJECT, f"unsupported message type {mtype}; this listener takes ORU^R01")
    out = OruMessage(control, mtype, msh.get(3, enc=enc), msh.get(4, enc=enc))
    pid = next((s for s in segs if s.name == "PID"), None)
    if pid is None:
        raise Hl7Refusal(ERROR, "no PID segment")
    patient_id = issuer = ""
    for r in range(1, pid.repetitions(3, enc) + 1):
        ident = pid.get(3, 1, r, enc=enc)
        if ident and (not patient_id or pid.get(3, 5, r, enc=enc) == "MR"):
            patient_id, issuer = ident, pid.get(3, 4, r, enc=enc)
    if not patient_id:
        raise Hl7Refusal(ERROR, "PID-3 (patient identifier) is empty")
    obr: Segment | None = None
    n_obx = 0
    for seg in segs:
        if seg.name == "OBR":
            obr = seg
        elif seg.name == "OBX":
            n_obx += 1
            where = f"OBX {n_obx} (set ID {seg.get(1, enc=enc) or '?'})"
            code, system = seg.get(3, 1, enc=enc), seg.get(3, 3, enc=enc)
            if not code:
                raise Hl7Refusal(ERROR, f"{where}: OBX-3 has no observation code")
            if system not in ("LN", "LNC") and not _LOINC.match(code):
                raise Hl7Refusal(ERROR, f"{where}: OBX-3 code {code!r} is not LOINC")
            status = seg.get(11, enc=enc) or "F"
            if status not in ("F", "C"):
                out.skipped += 1
                continue
            vtype = seg.get(2, enc=enc)
            raw = seg.fields[5] if len(seg.fields) > 5 else ""
            value: float | str
            if vtype == "NM":
                try:
                    value = float(raw.strip())
                except ValueError:
                    raise Hl7Refusal(
                        ERROR, f"{where}: OBX-5 value {raw!r} is not a number (OBX-2 is NM)"
                    ) from None
            elif vtype == "SN":  # structured numeric: comparator^number
                comparator, number = seg.get(5, 1, enc=enc), seg.get(5, 2, enc=enc)
                if comparator not in ("", "="):
                    out.skipped += 1  # "<5", ">1000": no exact value to use
                    continue
                try:
                    value = float(number)
                except ValueError:
                    raise Hl7Refusal(
                        ERROR, f"{where}: OBX-5 structured numeric {raw!r} has no number"
                    ) from None
            elif vtype in ("CWE", "CE"):
                value = seg.get(5, 2, enc=enc) or seg.get(5, 1, enc=enc)
            else:
                value = raw
            ts = seg.get(14, enc=enc) or (obr.get(7, enc=enc) if obr else "")
            when = parse_ts(ts, zone) if ts else None
            if when is None:
                raise Hl7Refusal(
                    ERROR, f"{where}: no valid observation time in OBX-14 or OBR-7 ({ts!r})"
                )
            accession = obr.get(3, enc=enc) if obr else ""
            out.labs.append(
                LabRecord(
                    patient_id=patient_id,
                    issuer=issuer,
                    code=code,
                    value=value,
                    unit=seg.get(6, 1, enc=enc),
                    observed_at=when,
                    source="hl7",
                    source_ref=f"{control}:{seg.get(1, enc=enc) or n_obx}",
                    accession_number=accession,
                    status="corrected" if status == "C" else "final",
                )
            )
    if n_obx == 0:
        raise Hl7Refusal(ERROR, "no OBX segment: the message carries no result")
    return out


def _escape(text: str) -> str:
    return (
        text.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("~", "\\R\\")
        .replace("&", "\\T\\")
        .replace("\r", " ")
        .replace("\n", " ")
    )


def build_ack(
    code: str, control_id: str, reason: str = "", receiver: tuple[str, str] = ("", "")
) -> str:
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    segs = [
        f"MSH|^~\\&|HPBNODE|HPBNODE|{_escape(receiver[0])}|{_escape(receiver[1])}|{now}||"
        f"ACK^R01^ACK|ACK-{_escape(control_id)[:50]}|P|2.5.1",
        f"MSA|{code}|{_escape(control_id)}|{_escape(reason)[:80]}",
    ]
    if code != ACCEPT:
        segs.append(f"ERR|||{'207' if code == REJECT else '100'}|E||||{_escape(reason)}")
    return "\r".join(segs) + "\r"


def _control_id_of(text: str) -> tuple[str, tuple[str, str]]:
    """Best-effort MSH-10 and sender of a message that failed to parse (for the ACK)."""
    first = re.split(r"\r|\n", text.strip(), maxsplit=1)[0] if text.strip() else ""
    if first.startswith("MSH") and len(first) > 3:
        parts = first.split(first[3])
        get = lambda i: parts[i] if len(parts) > i else ""  # noqa: E731
        return get(9), (get(2), get(3))
    return "", ("", "")


class Hl7Handler:
    """Parse, store and acknowledge one message; bound to a session factory."""

    def __init__(self, sessions: Callable[[], Session], timezone: str = "UTC") -> None:
        self.sessions = sessions
        self.tz = ZoneInfo(timezone)

    def __call__(self, text: str) -> str:
        control, sender = _control_id_of(text)
        try:
            msg = parse_oru(text, self.tz)
        except Hl7Refusal as refusal:
            self._log(control, "", refusal.code, refusal.reason, 0)
            return build_ack(refusal.code, control, refusal.reason, sender)
        try:
            with self.sessions() as session, session.begin():
                dup = session.execute(
                    select(Hl7Message.id).where(
                        Hl7Message.control_id == msg.control_id, Hl7Message.ack_code == ACCEPT
                    )
                ).first()
                if dup is not None:
                    reason = "duplicate message control ID: already stored"
                    return build_ack(ACCEPT, msg.control_id, reason, sender)
                result = store_batch(session, msg.labs, msg.notes, where=f"message {control}")
                note = f"{result.stored} stored"
                if msg.skipped or result.not_in_panel:
                    note += f", {msg.skipped + result.not_in_panel} skipped (status or panel)"
                if result.implausible:
                    note += f", {len(result.implausible)} implausible kept flagged"
                session.add(
                    Hl7Message(
                        control_id=msg.control_id,
                        message_type=msg.message_type,
                        ack_code=ACCEPT,
                        reason=note,
                        observations=result.stored,
                    )
                )
        except ClinicalDataError as exc:
            self._log(msg.control_id, msg.message_type, ERROR, str(exc), 0)
            return build_ack(ERROR, msg.control_id, str(exc), sender)
        except SQLAlchemyError as exc:
            log.error("HL7 message could not be stored: %s", type(exc).__name__)
            reason = "database error: message not stored, please resend"
            return build_ack(REJECT, msg.control_id, reason, sender)
        log.info("HL7 %s accepted: %s", msg.message_type, note)
        return build_ack(ACCEPT, msg.control_id, note, sender)

    def _log(self, control: str, mtype: str, code: str, reason: str, n: int) -> None:
        log.warning("HL7 message answered %s: %s", code, reason)
        try:
            with self.sessions() as session, session.begin():
                session.add(
                    Hl7Message(
                        control_id=control[:64],
                        message_type=mtype,
                        ack_code=code,
                        reason=reason,
                        observations=n,
                    )
                )
        except SQLAlchemyError as exc:
            log.error("could not log HL7 message outcome: %s", type(exc).__name__)


class MllpServer:
    """An asyncio MLLP listener; ``start()`` runs it in a background thread."""

    def __init__(
        self, handler: Callable[[str], str], host: str = "127.0.0.1", port: int = 2575
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                buf += chunk
                while FS + CR in buf:
                    frame, buf = buf.split(FS + CR, 1)
                    start = frame.find(VT)
                    text = (
                        frame[start + 1 :].decode("utf-8", errors="replace") if start >= 0 else ""
                    )
                    ack = await asyncio.to_thread(self.handler, text)
                    writer.write(VT + ack.encode("utf-8") + FS + CR)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def serve(self) -> None:
        """Serve until cancelled (``hpb-node clinical listen`` runs this)."""
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._ready.set()
        async with self._server:
            await self._server.serve_forever()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self.serve())
        except asyncio.CancelledError:
            pass
        except OSError as exc:
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="mllp", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise ClinicalDataError(f"MLLP listener did not start on {self.host}:{self.port}")
        if self._error is not None:
            raise ClinicalDataError(
                f"MLLP listener cannot listen on {self.host}:{self.port}: {self._error}"
            )

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is not None and server is not None and loop.is_running():

            def _close() -> None:
                server.close()
                for task in asyncio.all_tasks(loop):
                    task.cancel()

            loop.call_soon_threadsafe(_close)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> MllpServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
