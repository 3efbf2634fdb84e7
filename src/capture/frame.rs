//! The pixels of one captured frame, in a buffer reused frame to frame.
//!
//! Apart from the camera thread so that the decoders (and their fuzz targets,
//! which build only these files) need nothing else of the daemon.

use super::limits::fit_capacity;

/// Pixel layout of a captured frame (8 bits per sample, rows packed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    Rgb8,
    Gray8,
}

impl PixelFormat {
    pub fn bytes_per_pixel(self) -> usize {
        match self {
            PixelFormat::Rgb8 => 3,
            PixelFormat::Gray8 => 1,
        }
    }
}

/// Pixels of one frame; the `data` allocation is reused from frame to frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameData {
    pub width: u32,
    pub height: u32,
    pub format: PixelFormat,
    pub data: Vec<u8>,
}

impl Default for FrameData {
    fn default() -> Self {
        FrameData { width: 0, height: 0, format: PixelFormat::Rgb8, data: Vec::new() }
    }
}

impl FrameData {
    /// Sets the geometry and sizes `data` for it (reusing the allocation).
    pub fn reshape(&mut self, width: u32, height: u32, format: PixelFormat) -> &mut [u8] {
        self.width = width;
        self.height = height;
        self.format = format;
        let len = width as usize * height as usize * format.bytes_per_pixel();
        self.data.resize(len, 0);
        // After one huge frame the buffer gives its memory back (it would
        // otherwise circulate through the recycle channels at its peak size).
        fit_capacity(&mut self.data, len);
        &mut self.data
    }

    /// Copies an `image` crate image in, converting to RGB or gray as given.
    pub fn fill_from_image(&mut self, img: &image::DynamicImage, format: PixelFormat) {
        match format {
            PixelFormat::Rgb8 => match img {
                image::DynamicImage::ImageRgb8(rgb) => {
                    self.reshape(rgb.width(), rgb.height(), format).copy_from_slice(rgb.as_raw())
                }
                other => {
                    let rgb = other.to_rgb8();
                    self.reshape(rgb.width(), rgb.height(), format).copy_from_slice(rgb.as_raw())
                }
            },
            PixelFormat::Gray8 => {
                let g = img.to_luma8();
                self.reshape(g.width(), g.height(), format).copy_from_slice(g.as_raw())
            }
        }
    }
}
