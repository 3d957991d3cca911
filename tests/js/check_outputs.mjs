// Loads hpb-node SEG and TID 1500 SR with the libraries OHIF 3.12 uses
// (@cornerstonejs/adapters 4.15.29, dcmjs 0.49.4) the way OHIF calls them:
//   SEG: adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer
//   SR:  adaptersSR.Cornerstone3D.MeasurementReport.generateToolState
// The source images are parsed with dcmjs and served through a Cornerstone
// metadata provider (the shim OHIF's DICOMweb metadata store provides in the
// viewer). Prints one JSON object with what was recovered.
//
// usage: node bundle.cjs manifest.json   (manifest: {seg, sr, sources: [paths]})
import { readFileSync } from "node:fs";
import * as dcmjs from "dcmjs";
import { metaData, cache } from "@cornerstonejs/core";
import { adaptersSEG, adaptersSR } from "@cornerstonejs/adapters";

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

function toArrayBuffer(buf) {
  return buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength);
}

function readNaturalized(path) {
  const msg = DicomMessage.readFile(toArrayBuffer(readFileSync(path)));
  const ds = DicomMetaDictionary.naturalizeDataset(msg.dict);
  ds._meta = DicomMetaDictionary.namifyDataset(msg.meta);
  return ds;
}

function num(v) {
  return Array.isArray(v) ? v.map(Number) : Number(v);
}

// ---- metadata provider built from the real source files -----------------------
const manifest = JSON.parse(readFileSync(process.argv[2], "utf8"));
const instances = new Map(); // imageId -> naturalized dataset
const imageIds = [];
for (const path of manifest.sources) {
  const ds = readNaturalized(path);
  delete ds.PixelData;
  const nFrames = Number(ds.NumberOfFrames || 1);
  for (let f = 1; f <= nFrames; f++) {
    const imageId = `hpb:${ds.SOPInstanceUID}:${f}`;
    instances.set(imageId, { ds, frame: f });
    imageIds.push(imageId);
  }
}

function planeOf(ds, frame) {
  if (ds.ImagePositionPatient) {
    return { ipp: num(ds.ImagePositionPatient), iop: num(ds.ImageOrientationPatient), ps: num(ds.PixelSpacing) };
  }
  const per = ds.PerFrameFunctionalGroupsSequence[frame - 1];
  const shared = ds.SharedFunctionalGroupsSequence || {};
  const pick = (key) => (per[key] || shared[key]);
  const one = (x) => (Array.isArray(x) ? x[0] : x);
  return {
    ipp: num(one(pick("PlanePositionSequence")).ImagePositionPatient),
    iop: num(one(pick("PlaneOrientationSequence")).ImageOrientationPatient),
    ps: num(one(pick("PixelMeasuresSequence")).PixelSpacing),
  };
}

function provider(type, imageId) {
  const entry = instances.get(imageId);
  if (!entry) return undefined;
  const { ds, frame } = entry;
  const { ipp, iop, ps } = planeOf(ds, frame);
  switch (type) {
    case "imagePlaneModule":
      return {
        frameOfReferenceUID: ds.FrameOfReferenceUID,
        rows: ds.Rows,
        columns: ds.Columns,
        imageOrientationPatient: iop,
        rowCosines: iop.slice(0, 3),
        columnCosines: iop.slice(3, 6),
        imagePositionPatient: ipp,
        pixelSpacing: ps,
        rowPixelSpacing: ps[0],
        columnPixelSpacing: ps[1],
        sliceThickness: Number(ds.SliceThickness || 1),
        usingDefaultValues: false,
      };
    case "generalSeriesModule":
      return { modality: ds.Modality, seriesInstanceUID: ds.SeriesInstanceUID, seriesNumber: ds.SeriesNumber };
    case "generalImageModule":
      return { sopInstanceUID: ds.SOPInstanceUID, instanceNumber: ds.InstanceNumber };
    case "sopCommonModule":
      return { sopInstanceUID: ds.SOPInstanceUID, sopClassUID: ds.SOPClassUID };
    case "imagePixelModule":
      return {
        samplesPerPixel: 1,
        photometricInterpretation: ds.PhotometricInterpretation,
        rows: ds.Rows,
        columns: ds.Columns,
        bitsAllocated: ds.BitsAllocated,
        bitsStored: ds.BitsStored,
        highBit: ds.HighBit,
        pixelRepresentation: ds.PixelRepresentation,
      };
    case "frameNumber":
      return frame;
    case "instance":
      return { ...ds, frameNumber: frame };
    default:
      return undefined;
  }
}
metaData.addProvider(provider, 10000);
const metadataProvider = { get: (type, imageId) => metaData.get(type, imageId) };

const out = {};

// ---- SEG ------------------------------------------------------------------------
if (manifest.seg) {
  const result = await adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(
    imageIds,
    toArrayBuffer(readFileSync(manifest.seg)),
    { metadataProvider },
  );
  const segments = result.segMetadata.data.filter((s) => s);
  const counts = {};
  for (const layer of result.labelMapImages) {
    for (const image of layer) {
      const px = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
      for (let i = 0; i < px.length; i++) {
        if (px[i]) counts[px[i]] = (counts[px[i]] || 0) + 1;
      }
    }
  }
  out.seg = {
    segmentCount: segments.length,
    labels: segments.map((s) => s.SegmentLabel),
    numbers: segments.map((s) => s.SegmentNumber),
    voxelCounts: counts,
    overlapping: Boolean(result.overlappingSegments),
    layers: result.labelMapImages.length,
  };
}

// ---- SR -------------------------------------------------------------------------
if (manifest.sr) {
  const sr = readNaturalized(manifest.sr);
  const sopToImageId = {};
  for (const [imageId, { ds, frame }] of instances) {
    sopToImageId[`${ds.SOPInstanceUID}:${frame}`] = imageId;
  }
  const quiet = console.log;
  console.log = () => {}; // generateToolState logs every measurement
  const warnings = [];
  const warn = console.warn;
  console.warn = (...args) => warnings.push(String(args[0]) + " " + String(args[2] || ""));
  let toolState;
  try {
    toolState = adaptersSR.Cornerstone3D.MeasurementReport.generateToolState(
      sr,
      sopToImageId,
      metadataProvider,
    );
  } finally {
    console.log = quiet;
    console.warn = warn;
  }
  const annotations = [];
  for (const [toolType, list] of Object.entries(toolState)) {
    for (const m of list) {
      const stats = Object.values(m.annotation.data.cachedStats || {})[0] || {};
      annotations.push({
        toolType,
        length: stats.length,
        width: stats.width,
        unit: stats.unit,
        referencedImageId: m.annotation.metadata.referencedImageId,
        points: m.annotation.data.handles?.points,
        trackingUID: m.TrackingUniqueIdentifier,
        finding: m.finding?.CodeMeaning,
      });
    }
  }
  out.sr = { annotations, warnings };
}
cache.purgeCache();
process.stdout.write(JSON.stringify(out) + "\n");
