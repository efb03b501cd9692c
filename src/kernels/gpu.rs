//! The same layer formats on a GPU through wgpu compute shaders (WGSL): a tiled dense GEMM
//! (a row-per-workgroup GEMV below batch 8), CSR SpMM (one workgroup per row) and N:M
//! compressed. Compute stays off the UI thread (the
//! worker and the CLI own it), because creating a second wgpu instance beside eframe's GL
//! context failed there.
//!
//! Where no hardware adapter exists wgpu finds Mesa's software rasteriser (llvmpipe through GL,
//! lavapipe through Vulkan): the kernels are checked there, and [`DeviceInfo::software`] marks
//! its timings as not hardware figures.

use std::sync::mpsc;

use wgpu::util::DeviceExt;

use super::Dense;
use crate::latency::{Device, DeviceInfo, Kernel, Timing, time_it};

const SHADER: &str = r#"
struct Params { rows: u32, cols: u32, batch: u32, extra: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> aux0: array<u32>;
@group(0) @binding(5) var<storage, read> aux1: array<u32>;

const T: u32 = 16u;
var<workgroup> wt: array<array<f32, 16>, 16>;
var<workgroup> xt: array<array<f32, 16>, 16>;

// y[b][r] = sum_k w[r][k] * x[b][k], in 16 x 16 output tiles (rows x batch) that stage
// 16-wide slices of W and X in workgroup memory.
@compute @workgroup_size(16, 16)
fn dense(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let r = wg.x * T + l.x;
    let b = wg.y * T + l.y;
    var acc = 0.0;
    let tiles = (p.cols + T - 1u) / T;
    for (var t = 0u; t < tiles; t++) {
        let k = t * T + l.x;
        let wr = wg.x * T + l.y;
        let xb = wg.y * T + l.y;
        var wv = 0.0;
        if (wr < p.rows && k < p.cols) { wv = w[wr * p.cols + k]; }
        wt[l.y][l.x] = wv;
        var xv = 0.0;
        if (xb < p.batch && k < p.cols) { xv = x[xb * p.cols + k]; }
        xt[l.y][l.x] = xv;
        workgroupBarrier();
        for (var j = 0u; j < T; j++) { acc += wt[l.x][j] * xt[l.y][j]; }
        workgroupBarrier();
    }
    if (r < p.rows && b < p.batch) { y[b * p.rows + r] = acc; }
}

var<workgroup> part: array<f32, 64>;

fn reduce_store(li: u32, acc: f32, at: u32) {
    part[li] = acc;
    workgroupBarrier();
    for (var off = 32u; off > 0u; off >>= 1u) {
        if (li < off) { part[li] += part[li + off]; }
        workgroupBarrier();
    }
    if (li == 0u) { y[at] = part[0]; }
    workgroupBarrier();
}

// Dense at small batches: one workgroup per row, its 64 threads striding along the row (the
// tiled kernel would leave most of each 16 x 16 tile idle when the batch is below 16).
@compute @workgroup_size(64)
fn gemv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = wg.x + wg.y * 32768u;
    if (r >= p.rows) { return; }
    let s = r * p.cols;
    for (var b = 0u; b < p.batch; b++) {
        var acc = 0.0;
        for (var k = li; k < p.cols; k += 64u) { acc += w[s + k] * x[b * p.cols + k]; }
        reduce_store(li, acc, b * p.rows + r);
    }
}

// CSR: one workgroup per row (aux0 = row pointers, aux1 = column indices), its 64 threads
// striding over the row's non-zeros.
@compute @workgroup_size(64)
fn csr(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = wg.x + wg.y * 32768u;
    if (r >= p.rows) { return; }
    let s = aux0[r];
    let e = aux0[r + 1u];
    for (var b = 0u; b < p.batch; b++) {
        var acc = 0.0;
        for (var k = s + li; k < e; k += 64u) { acc += w[k] * x[b * p.cols + aux1[k]]; }
        reduce_store(li, acc, b * p.rows + r);
    }
}

// N:M: every row holds ceil(cols/m) groups of n values; aux0 packs their in-group positions,
// four bytes to a word. extra = n | m << 16.
@compute @workgroup_size(64)
fn nm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = wg.x + wg.y * 32768u;
    if (r >= p.rows) { return; }
    let n = p.extra & 0xffffu;
    let m = p.extra >> 16u;
    let per_row = ((p.cols + m - 1u) / m) * n;
    let s = r * per_row;
    for (var b = 0u; b < p.batch; b++) {
        var acc = 0.0;
        for (var i = li; i < per_row; i += 64u) {
            let k = s + i;
            let pos = (aux0[k / 4u] >> ((k % 4u) * 8u)) & 0xffu;
            let c = (i / n) * m + pos;
            acc += w[k] * x[b * p.cols + c];
        }
        reduce_store(li, acc, b * p.rows + r);
    }
}
"#;

/// Below this batch the dense layer runs as row-per-workgroup GEMV, from it as tiled GEMM.
const TILED_FROM_BATCH: usize = 8;

/// Dispatches per timed submission: enough to hide the submit-and-wait round trip.
const DISPATCHES_PER_SAMPLE: usize = 4;

/// A wgpu device with the three pipelines.
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: DeviceInfo,
    max_binding: u64,
    dense: wgpu::ComputePipeline,
    gemv: wgpu::ComputePipeline,
    csr: wgpu::ComputePipeline,
    nm: wgpu::ComputePipeline,
}

enum Which {
    Dense,
    Csr,
    Nm,
}

/// A layer's weights on the GPU.
pub struct GpuKernel {
    which: Which,
    rows: usize,
    cols: usize,
    extra: u32,
    w: wgpu::Buffer,
    aux: [wgpu::Buffer; 2],
}

impl Gpu {
    /// The highest-performance adapter wgpu finds (a hardware GPU before a software one).
    pub fn new() -> Result<Gpu, String> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle().with_env());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
        .map_err(|e| format!("no GPU adapter: {e}"))?;
        let ai = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("prunescope kernels"),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| format!("GPU adapter {}: no device: {e}", ai.name))?;
        let lower = ai.name.to_lowercase();
        let software = ai.device_type == wgpu::DeviceType::Cpu
            || ["llvmpipe", "lavapipe", "softpipe", "swiftshader"]
                .iter()
                .any(|s| lower.contains(s));
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("prunescope kernels"),
            source: wgpu::ShaderSource::Wgsl(SHADER.into()),
        });
        let pipeline = |entry: &str| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let (dense, gemv) = (pipeline("dense"), pipeline("gemv"));
        let (csr, nm) = (pipeline("csr"), pipeline("nm"));
        Ok(Gpu {
            info: DeviceInfo {
                device: Device::Gpu,
                name: ai.name.clone(),
                backend: format!("{:?}", ai.backend),
                software,
                threads: 0,
            },
            max_binding: limits
                .max_storage_buffer_binding_size
                .min(limits.max_buffer_size),
            device,
            queue,
            dense,
            gemv,
            csr,
            nm,
        })
    }

    pub fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    fn storage(&self, label: &str, bytes: &[u8]) -> Result<wgpu::Buffer, String> {
        // A zero-sized binding is invalid: every buffer holds at least one word.
        let padded;
        let contents = if bytes.len() < 4 {
            padded = [0u8; 4];
            &padded[..]
        } else {
            bytes
        };
        if contents.len() as u64 > self.max_binding {
            return Err(format!(
                "{label} needs {} MiB in one buffer; this adapter binds at most {} MiB",
                contents.len() >> 20,
                self.max_binding >> 20
            ));
        }
        Ok(self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents,
                usage: wgpu::BufferUsages::STORAGE,
            }))
    }

    /// Uploads a layer's weights in its format (block-sparse has no GPU kernel).
    pub fn upload(&self, kernel: &Kernel) -> Result<GpuKernel, String> {
        let words = |v: &[u32]| bytemuck::cast_slice::<u32, u8>(v).to_vec();
        let (which, rows, cols, extra, w, a0, a1) = match kernel {
            Kernel::Dense(d) => (
                Which::Dense,
                d.rows,
                d.cols,
                0,
                bytemuck::cast_slice(&d.w).to_vec(),
                vec![],
                vec![],
            ),
            Kernel::Csr(c) => {
                let idx: Vec<u32> = if c.idx32.is_empty() {
                    c.idx16.iter().map(|&i| i as u32).collect()
                } else {
                    c.idx32.clone()
                };
                (
                    Which::Csr,
                    c.rows,
                    c.cols,
                    0,
                    bytemuck::cast_slice(&c.values).to_vec(),
                    words(&c.row_ptr),
                    words(&idx),
                )
            }
            Kernel::Nm(n) => {
                if n.n >= 1 << 16 || n.m >= 1 << 16 || n.m > 256 {
                    return Err(format!("{}:{} is beyond the GPU N:M kernel", n.n, n.m));
                }
                let mut pos = n.pos.clone();
                pos.resize(pos.len().div_ceil(4) * 4, 0);
                (
                    Which::Nm,
                    n.rows,
                    n.cols,
                    (n.n | n.m << 16) as u32,
                    bytemuck::cast_slice(&n.values).to_vec(),
                    pos,
                    vec![],
                )
            }
            Kernel::Block(_) => return Err("block-sparse has no GPU kernel".into()),
        };
        Ok(GpuKernel {
            which,
            rows,
            cols,
            extra,
            w: self.storage("weights", &w)?,
            aux: [self.storage("aux0", &a0)?, self.storage("aux1", &a1)?],
        })
    }

    /// Input, output and parameter buffers for one batch size, and the bind group over them.
    fn bind(
        &self,
        k: &GpuKernel,
        x: &[f32],
        batch: usize,
    ) -> Result<(wgpu::BindGroup, wgpu::Buffer), String> {
        let params = [k.rows as u32, k.cols as u32, batch as u32, k.extra];
        let p = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytemuck::cast_slice(&params),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let xb = self.storage("x", bytemuck::cast_slice(x))?;
        let y_bytes = ((batch * k.rows).max(1) * 4) as u64;
        if y_bytes > self.max_binding {
            return Err(format!(
                "the output of batch {batch} exceeds the adapter's binding size"
            ));
        }
        let y = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("y"),
            size: y_bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let layout = self.pipeline(k, batch).get_bind_group_layout(0);
        let mut entries = vec![
            wgpu::BindGroupEntry {
                binding: 0,
                resource: p.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: k.w.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 2,
                resource: xb.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 3,
                resource: y.as_entire_binding(),
            },
        ];
        // Auto layouts hold only the bindings an entry point uses.
        match k.which {
            Which::Dense => {}
            Which::Nm => entries.push(wgpu::BindGroupEntry {
                binding: 4,
                resource: k.aux[0].as_entire_binding(),
            }),
            Which::Csr => {
                for (i, b) in k.aux.iter().enumerate() {
                    entries.push(wgpu::BindGroupEntry {
                        binding: 4 + i as u32,
                        resource: b.as_entire_binding(),
                    });
                }
            }
        }
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("layer"),
            layout: &layout,
            entries: &entries,
        });
        Ok((group, y))
    }

    fn pipeline(&self, k: &GpuKernel, batch: usize) -> &wgpu::ComputePipeline {
        match k.which {
            Which::Dense if batch < TILED_FROM_BATCH => &self.gemv,
            Which::Dense => &self.dense,
            Which::Csr => &self.csr,
            Which::Nm => &self.nm,
        }
    }

    fn encode(
        &self,
        k: &GpuKernel,
        group: &wgpu::BindGroup,
        batch: usize,
        times: usize,
    ) -> wgpu::CommandEncoder {
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: None,
            });
            pass.set_pipeline(self.pipeline(k, batch));
            pass.set_bind_group(0, group, &[]);
            let (gx, gy) = match k.which {
                Which::Dense if batch >= TILED_FROM_BATCH => {
                    (k.rows.div_ceil(16), batch.div_ceil(16))
                }
                Which::Dense | Which::Csr | Which::Nm => {
                    (k.rows.min(32768), k.rows.div_ceil(32768))
                }
            };
            for _ in 0..times {
                pass.dispatch_workgroups(gx.max(1) as u32, gy.max(1) as u32, 1);
            }
        }
        enc
    }

    fn wait(&self) -> Result<(), String> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| format!("GPU wait failed: {e}"))
    }

    /// `y = W x` for `batch` inputs, read back (for checks against the CPU).
    pub fn run(&self, k: &GpuKernel, x: &[f32], batch: usize) -> Result<Vec<f32>, String> {
        assert_eq!(x.len(), batch * k.cols);
        let (group, y) = self.bind(k, x, batch)?;
        let size = y.size();
        let read = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.encode(k, &group, batch, 1);
        enc.copy_buffer_to_buffer(&y, 0, &read, 0, size);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = mpsc::channel();
        read.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("GPU readback failed: {e}"))?;
        let view = read
            .slice(..)
            .get_mapped_range()
            .map_err(|e| format!("GPU readback failed: {e}"))?;
        let mut out: Vec<f32> = bytemuck::cast_slice(&view[..]).to_vec();
        drop(view);
        read.unmap();
        out.truncate(batch * k.rows);
        Ok(out)
    }

    /// The largest absolute difference between `kernel` run here and the CPU dense kernel
    /// on `reference` (the same weights, dense), for inputs `x` of `batch` rows.
    pub fn max_err(
        &self,
        kernel: &Kernel,
        reference: &Dense,
        x: &[f32],
        batch: usize,
    ) -> Result<f64, String> {
        let mut want = vec![0f32; batch * reference.rows];
        reference.matvec(x, batch, &mut want);
        let got = self.run(&self.upload(kernel)?, x, batch)?;
        Ok(got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, f64::max))
    }

    /// Median time of one dispatch at `batch`, from submissions of several dispatches each,
    /// waited for: what a caller sees, submission included.
    pub fn time(&self, k: &GpuKernel, batch: usize, budget_ms: f64) -> Result<Timing, String> {
        let x = crate::latency::random_input(batch * k.cols, batch as u64);
        let (group, _y) = self.bind(k, &x, batch)?;
        let mut failed = None;
        let t = time_it(budget_ms, || {
            let enc = self.encode(k, &group, batch, DISPATCHES_PER_SAMPLE);
            self.queue.submit([enc.finish()]);
            if let Err(e) = self.wait() {
                failed = Some(e);
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let per = DISPATCHES_PER_SAMPLE as f64;
        Ok(Timing {
            median_ms: t.median_ms / per,
            min_ms: t.min_ms / per,
            max_ms: t.max_ms / per,
            runs: t.runs,
        })
    }
}
