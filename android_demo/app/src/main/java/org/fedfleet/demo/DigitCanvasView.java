package org.fedfleet.demo;

import android.content.Context;
import android.graphics.Bitmap;
import android.graphics.Canvas;
import android.graphics.Color;
import android.graphics.Paint;
import android.util.AttributeSet;
import android.view.MotionEvent;
import android.view.View;

/**
 * A square to draw a digit on with a finger, read out as the model's input: 8x8 cells, each the
 * ink coverage of its cell in [0, 1] (what sklearn's digits are: 4x4 blocks of a 32x32 bitmap).
 */
public final class DigitCanvasView extends View {
  private static final int SIDE = 8;
  private final Paint ink = new Paint(Paint.ANTI_ALIAS_FLAG);
  private Bitmap bitmap;
  private Canvas canvas;
  private float lastX = Float.NaN;
  private float lastY;

  public DigitCanvasView(Context context, AttributeSet attrs) {
    super(context, attrs);
    ink.setColor(Color.WHITE);
    ink.setStrokeCap(Paint.Cap.ROUND);
  }

  @Override
  protected void onMeasure(int widthSpec, int heightSpec) {
    int side = MeasureSpec.getSize(widthSpec);
    setMeasuredDimension(side, side);
  }

  @Override
  protected void onSizeChanged(int w, int h, int oldW, int oldH) {
    bitmap = Bitmap.createBitmap(w, h, Bitmap.Config.ARGB_8888);
    canvas = new Canvas(bitmap);
    ink.setStrokeWidth(w / 10f); // a stroke about as thick as the digits' pen, relative to the box
    clear();
  }

  void clear() {
    if (canvas != null) {
      canvas.drawColor(Color.BLACK);
      invalidate();
    }
  }

  @Override
  protected void onDraw(Canvas c) {
    c.drawBitmap(bitmap, 0, 0, null);
  }

  @Override
  public boolean onTouchEvent(MotionEvent e) {
    float x = e.getX();
    float y = e.getY();
    if (e.getAction() == MotionEvent.ACTION_DOWN || Float.isNaN(lastX)) {
      lastX = x;
      lastY = y;
    }
    canvas.drawLine(lastX, lastY, x, y, ink);
    lastX = x;
    lastY = y;
    if (e.getAction() == MotionEvent.ACTION_UP) {
      lastX = Float.NaN;
      performClick();
    }
    invalidate();
    return true;
  }

  @Override
  public boolean performClick() {
    return super.performClick();
  }

  /** 64 values in [0, 1], row-major: the mean brightness of each cell. */
  float[] pixels() {
    Bitmap small = Bitmap.createScaledBitmap(bitmap, SIDE * 4, SIDE * 4, true);
    float[] out = new float[SIDE * SIDE];
    for (int y = 0; y < SIDE * 4; y++) {
      for (int x = 0; x < SIDE * 4; x++) {
        out[(y / 4) * SIDE + x / 4] += Color.red(small.getPixel(x, y)) / 255f / 16f;
      }
    }
    return out;
  }
}
